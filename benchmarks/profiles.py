"""Time per image against the number of profiles K, for profiles that share a trunk and for ones that do not.

Profiles learned with `--tune head` share the whole vision tower (only their heads differ), `--tune
top-2` everything below the last two blocks, `--tune all` nothing. The scorer groups them by that
shared prefix and runs each trunk once per batch (scorer.MergedModels). Measured here on pre-decoded
images (the model part of scoring, as a CPU worker runs it: one thread, forwards of 32 images), for
the starter bank's tiny ViT and for ViT-B-16 (random weights), side by side in one run. Coefficients
are random on the tuned layers and 1/n elsewhere, as learned profiles have them: time does not depend
on their values. Each time is the median of --repeats runs.

    python benchmarks/profiles.py                # about 10 minutes on 2 cores
    python benchmarks/profiles.py --skip-vit-b
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from score import random_bank  # noqa: E402

from laionfilter.bank import resolve_bank  # noqa: E402
from laionfilter.formats import PROFILE_FORMAT  # noqa: E402
from laionfilter.learn import tuned_layers  # noqa: E402
from laionfilter.mapper import Batch  # noqa: E402
from laionfilter.profile import Profile  # noqa: E402
from laionfilter.scorer import MergedModels  # noqa: E402


def synthetic_profiles(bank, k: int, tune: str, seed: int = 0) -> list[tuple[str, Profile]]:
    g = torch.Generator().manual_seed(seed)
    mask = tuned_layers(bank.layers, tune)
    meta = {"format": PROFILE_FORMAT, "name": "p", "bank": {"fingerprint": bank.fingerprint},
            "tasks": [t["name"] for t in bank.tasks], "layers": len(bank.layers)}
    out = []
    for j in range(k):
        alpha = torch.full((bank.n, len(bank.layers)), 1.0 / bank.n)
        alpha[:, mask] = torch.rand(bank.n, int(mask.sum()), generator=g) / bank.n * 2
        out.append((f"p{j}", Profile(alpha, dict(meta, name=f"p{j}"))))
    return out


def per_image(models: MergedModels, pixels: torch.Tensor, repeats: int) -> float:
    batch = Batch("bench", [{}] * len(pixels), list(range(len(pixels))), pixels)
    models.scores(Batch("bench", [{}] * 2, [0, 1], pixels[:2]))  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        models.scores(batch)
        times.append(time.perf_counter() - t)
    return statistics.median(times) / len(pixels)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-vit-b", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cpu = torch.device("cpu")
    setups = [("tiny", resolve_bank("starter"), torch.randn(256, 3, 64, 64),
               {"head": (1, 8, 64, 512), "top-2": (1, 8, 64), "all": (1, 8, 64)})]
    if not args.skip_vit_b:
        bank_b = random_bank(Path(tempfile.mkdtemp(prefix="lf-prof-")))
        setups.append(("ViT-B-16", bank_b, torch.randn(32, 3, 224, 224),
                       {"head": (1, 8, 64, 512), "top-2": (1, 8), "all": (1, 4)}))
    results = {}
    for label, bank, pixels, plan in setups:
        for tune, ks in plan.items():
            for k in ks:
                t = time.perf_counter()
                models = MergedModels(synthetic_profiles(bank, k, tune), bank, cpu, cpu_chunk=32)
                build = time.perf_counter() - t
                s = per_image(models, pixels, args.repeats)
                results[f"{label}, {tune}, K={k}"] = {"ms_per_image": round(1000 * s, 4), "build_s": round(build, 2),
                                                      "groups": [(g[0], len(g[1])) for g in models.groups][:3]}
                print(f"{label:8s} {tune:5s} K={k:<4d} {1000 * s:9.3f} ms/image  (build {build:.1f} s)", flush=True)
        one = results[f"{label}, all, K=1"]["ms_per_image"]
        for tune, ks in plan.items():
            base = results[f"{label}, {tune}, K=1"]["ms_per_image"]
            for k in ks[1:]:
                t = results[f"{label}, {tune}, K={k}"]["ms_per_image"]
                marginal = (t - base) / (k - 1) / one
                results[f"{label}, {tune}, K={k}"].update(ratio_to_k1=round(t / base, 3),
                                                          marginal_forwards=round(marginal, 4))
                print(f"{label:8s} {tune:5s} K={k:<4d} {t / base:6.2f}× K=1; one more profile costs "
                      f"{marginal:.4f} of a forward pass")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
