"""Time per image against the number of profiles K, for profiles that share a trunk and for ones that do not.

Profiles learned with `--tune head` share the whole vision tower (only their heads differ), `--tune
top-2` everything below the last two blocks, `--tune all` nothing. The scorer groups them by that
shared prefix and runs each trunk once per batch (scorer.MergedModels). Measured here on pre-decoded
images (the model part of scoring, as a CPU worker runs it: one thread, forwards of 32 images), for
the starter bank's tiny ViT and for ViT-B-16 (random weights), side by side in one run. Coefficients
are random on the tuned layers and 1/n elsewhere, as learned profiles have them: time does not depend
on their values. Each time is the median of --repeats runs.

On a GPU (``--device cuda``) the same profiles run as ``score`` runs them there: bf16 autocast, the
whole batch in one forward (``--batch``, default 256), the pixels already on the device so that the
time is the model's. ``--check`` first scores 64 photos with K = 8 ``head`` and
``top-2`` profiles grouped, and each profile alone, on the device, and reports the largest difference
relative to the scores' range (the test suite checks this on the CPU in float32).

    python benchmarks/profiles.py                # about 10 minutes on 2 cores
    python benchmarks/profiles.py --skip-vit-b
    python benchmarks/profiles.py --device cuda --check --json profiles-gpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from score import decoded_pixels, make_shards, random_bank  # noqa: E402

from laionfilter.bank import resolve_bank  # noqa: E402
from laionfilter.formats import PROFILE_FORMAT  # noqa: E402
from laionfilter.start import tuned_layers  # noqa: E402
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
    """Seconds per image of ``models.scores`` on ``pixels`` (it copies the scores to the host, so a GPU's
    work is finished when the clock is read)."""
    batch = Batch("bench", [{}] * len(pixels), list(range(len(pixels))), pixels)
    warm = batch if pixels.device.type == "cuda" else Batch("bench", [{}] * 2, [0, 1], pixels[:2])
    models.scores(warm)  # on a GPU at full size: cuBLAS picks its kernels per shape
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        models.scores(batch)
        times.append(time.perf_counter() - t)
    return statistics.median(times) / len(pixels)


def grouped_against_alone(bank, pixels: torch.Tensor, device: torch.device, tune: str, k: int = 8) -> dict:
    """Largest |grouped − alone| over the K profiles' scores on ``device``, relative to the scores' range;
    on a GPU also each one's largest difference from the profile alone on the CPU in float32."""
    profiles = synthetic_profiles(bank, k, tune, seed=1)

    def scored(group, dev):
        x = pixels.to(dev)
        return MergedModels(group, bank, dev).scores(Batch("check", [{}] * len(x), list(range(len(x))), x))

    together = scored(profiles, device)
    worst = dict.fromkeys(["grouped_vs_alone"] + (["grouped_vs_cpu_fp32", "alone_vs_cpu_fp32"] if device.type != "cpu" else []), 0.0)
    span = 0.0
    for name, prof in profiles:
        alone = np.asarray(scored([(name, prof)], device)[name])
        grouped = np.asarray(together[name])
        worst["grouped_vs_alone"] = max(worst["grouped_vs_alone"], float(np.abs(grouped - alone).max()))
        span = max(span, float(np.ptp(alone)))
        if device.type != "cpu":
            ref = np.asarray(scored([(name, prof)], torch.device("cpu"))[name])
            worst["grouped_vs_cpu_fp32"] = max(worst["grouped_vs_cpu_fp32"], float(np.abs(grouped - ref).max()))
            worst["alone_vs_cpu_fp32"] = max(worst["alone_vs_cpu_fp32"], float(np.abs(alone - ref).max()))
    return {"k": k, "score_range": span, **{f"max_abs_diff_{w}_over_range": v / span for w, v in worst.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-vit-b", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    ap.add_argument("--device", default="cpu", help="cpu, or cuda: bf16 autocast and whole batches, as score runs there")
    ap.add_argument("--batch", type=int, default=None, help="ViT-B-16 images per timed call (default 32 on the CPU, 256 on a GPU)")
    ap.add_argument("--check", action="store_true", help="first compare grouped and alone scores on the device")
    args = ap.parse_args()
    dev = torch.device(args.device)
    gpu = dev.type == "cuda"
    results: dict = {"device": torch.cuda.get_device_name(dev) if gpu else "cpu", "torch": torch.__version__}
    if not gpu:
        torch.set_num_threads(1)
    starter = resolve_bank("starter")
    if args.check:
        urls = make_shards(Path(tempfile.mkdtemp(prefix="lf-check-")), 1, 64, 256)
        pixels = decoded_pixels(urls, starter.manifest["architecture"]["preprocess"], 64).to(dev)
        for tune in ("head", "top-2"):
            results[f"check, {tune}"] = r = grouped_against_alone(starter, pixels, dev, tune)
            print(f"{tune}, K = {r['k']}, largest difference over the scores' range: "
                  + ", ".join(f"{w.removeprefix('max_abs_diff_').removesuffix('_over_range').replace('_', ' ')} {v:.2e}"
                              for w, v in r.items() if w.startswith("max_")), flush=True)
    b = args.batch or (256 if gpu else 32)
    setups = [("tiny", starter, torch.randn(256, 3, 64, 64, device=dev),
               {"head": (1, 8, 64, 512), "top-2": (1, 8, 64), "all": (1, 8, 64)})]
    if not args.skip_vit_b:
        bank_b = random_bank(Path(tempfile.mkdtemp(prefix="lf-prof-")))
        setups.append(("ViT-B-16", bank_b, torch.randn(b, 3, 224, 224, device=dev),
                       {"head": (1, 8, 64, 512), "top-2": (1, 8, 64) if gpu else (1, 8), "all": (1, 4, 8) if gpu else (1, 4)}))
    for label, bank, pixels, plan in setups:
        for tune, ks in plan.items():
            for k in ks:
                t = time.perf_counter()
                models = MergedModels(synthetic_profiles(bank, k, tune), bank, dev, cpu_chunk=32)
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
