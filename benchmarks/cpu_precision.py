"""Scoring on the CPU in float32 against bf16 (``score --precision``), side by side in one run.

For ViT-B-16 (a bank from random weights: time does not depend on the values) and the starter bank:
  model-only images/s of the merged model on one thread, in float32, bf16 weights (as `score` holds
  them), bf16 autocast, and bf16 weights with channels-last and with torch.compile;
  end to end: `score_shards` with the default workers (one per core, each on one thread), fp32 and
  bf16 alternating, ``--repeats`` times (the median); and the two runs' agreement (Spearman, and the
  largest difference over the scores' range).

    python benchmarks/cpu_precision.py --json benchmarks/results/cpu-precision-epyc.json   # about 8 minutes
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from score import make_shards, profiles_for, random_bank  # noqa: E402

from laionfilter.bank import resolve_bank  # noqa: E402
from laionfilter.metrics import srocc  # noqa: E402
from laionfilter.profile import load_profile  # noqa: E402
from laionfilter.score import ScoreConfig, score_shards  # noqa: E402
from laionfilter.devices import cpu_has_bf16  # noqa: E402
from laionfilter.scorer import cpu_chunk_for  # noqa: E402


def model_only(bank, prof: Path, variant: str, seconds: float = 10.0) -> float:
    model = load_profile(prof).model(bank).eval()
    size = bank.manifest["architecture"]["preprocess"]["size"]
    size = size[0] if isinstance(size, list) else size
    chunk = cpu_chunk_for(bank.architecture)
    dtype = torch.float32 if variant in ("fp32", "autocast") else torch.bfloat16
    model.visual.to(dtype)
    x = torch.randn(chunk, 3, size, size, dtype=dtype)
    if variant == "bf16-channels-last":
        model.visual.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    fn = torch.compile(model) if variant == "bf16-compile" else model
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if variant == "autocast" else contextlib.nullcontext()
    with torch.inference_mode(), ctx:
        for _ in range(2):
            fn(x)
        n, t = 0, time.perf_counter()
        while time.perf_counter() - t < seconds:
            fn(x)
            n += len(x)
    return n / (time.perf_counter() - t)


def end_to_end(urls, bank, prof: Path, out: Path, precision: str) -> tuple[float, dict[str, float]]:
    s = score_shards(urls, [prof], out, bank=bank, progress=False,
                     cfg=ScoreConfig(batch_size=64, device="cpu", precision=precision, overwrite=True))
    import pyarrow.dataset as ds

    t = ds.dataset(sorted(map(str, out.glob("*.parquet"))), format="parquet").to_table(columns=["key", "p0"]).to_pydict()
    return s["samples"] / s["seconds"], dict(zip(t["key"], t["p0"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path)
    ap.add_argument("--images", type=int, default=128, help="ViT-B-16's end-to-end images (the starter's: 8×)")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="lf-precision-"))
    res: dict = {"torch": torch.__version__, "cpu_has_bf16": cpu_has_bf16(), "threads_model_only": 1}
    for name, bank, images in (("vit-b-16", random_bank(tmp / "vitb", "ViT-B-16"), args.images),
                               ("starter", resolve_bank("starter"), 8 * args.images)):
        [prof] = profiles_for(bank, 1, tmp / f"{name}-p")
        torch.set_num_threads(1)
        row = {"model_only": {v: round(model_only(bank, prof, v), 2) for v in
                              ("fp32", "bf16", "autocast", "bf16-channels-last", "bf16-compile")}}
        print(name, row, flush=True)
        urls = make_shards(tmp / f"{name}-shards", 2, images // 2, 256, seed=7)
        rates: dict[str, list[float]] = {"fp32": [], "bf16": []}
        scores = {}
        for _ in range(args.repeats):
            for precision in rates:
                rate, scores[precision] = end_to_end(urls, bank, prof, tmp / f"{name}-{precision}", precision)
                rates[precision].append(rate)
        keys = sorted(scores["fp32"])
        a, b = (np.array([scores[p][k] for k in keys]) for p in ("fp32", "bf16"))
        row["end_to_end"] = {p: round(float(np.median(r)), 2) for p, r in rates.items()}
        row["end_to_end"]["bf16_over_fp32"] = round(row["end_to_end"]["bf16"] / row["end_to_end"]["fp32"], 2)
        row["agreement"] = {"images": len(keys), "spearman": round(srocc(a, b), 5),
                            "max_abs_diff_over_range": round(float(np.abs(a - b).max() / np.ptp(a)), 5)}
        res[name] = row
        print(name, row, flush=True)
    if args.json:
        args.json.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
