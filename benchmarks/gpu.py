"""On a machine with a CUDA GPU: the scoring and learning paths checked there, and scoring throughput.

1. The same shards scored with the starter bank on the CPU (float32, full-size decoding: the reference)
   and on the GPU in float32 and bf16 weights (the default), each with full-size decoding by the workers
   and with nvJPEG (``--decode gpu``): largest difference relative to the scores' range, and Spearman
   against the reference.
2. A 10-image fit on each device: largest difference between the learned coefficients, and ms per step.
3. ViT-B-16 (a bank from random weights: time does not depend on the values): model-only images/s on
   the GPU (float32, bf16 autocast, and bf16 weights as `score` holds them), decode-only images/s with
   ``--workers`` DataLoader workers (full-size and scaled decoding), and end to end (`score_shards`,
   model building and worker start-up included) with each ``--decode`` (full, scaled, gpu), with its
   timing split, on 256-pixel and 1,024-pixel JPEGs.
4. ViT-L-14 model-only (the same ScoreModel class, random weights), unless ``--skip-vit-l``.

Every stage runs even if one before it failed (its error is recorded). Results go to ``--out`` (JSON),
written after each stage.

    python benchmarks/gpu.py --out gpu.json
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from score import decode_only, decoded_pixels, make_shards, profiles_for, random_bank  # noqa: E402

from laionfilter.bank import resolve_bank  # noqa: E402
from laionfilter.learn import fit
from laionfilter.merger import Merger  # noqa: E402
from laionfilter.objective import Scored  # noqa: E402
from laionfilter.recipe import LearnConfig  # noqa: E402
from laionfilter.metrics import srocc  # noqa: E402
from laionfilter.devices import autocast  # noqa: E402
from laionfilter.model import build_architecture  # noqa: E402
from laionfilter.profile import load_profile  # noqa: E402
from laionfilter.score import ScoreConfig, score_shards  # noqa: E402


def read_scores(out: Path, column: str) -> dict[str, float]:
    import pyarrow.dataset as ds

    t = ds.dataset(sorted(map(str, out.glob("*.parquet"))), format="parquet").to_table(columns=["key", column]).to_pydict()
    return dict(zip(t["key"], t[column]))


def many_shards(root: Path, shards: int, per_shard: int, workers: int, size: int = 256) -> list[str]:
    """``shards`` shards made in parallel (one seed each), under distinct names."""
    with mp.get_context("spawn").Pool(workers) as pool:
        made = pool.starmap(make_shards, [(root / f"{i:03d}", 1, per_shard, size, i) for i in range(shards)])
    return [str(Path(u).rename(root / f"{i:05d}.tar")) for i, [u] in enumerate(made)]


def model_rate(model: torch.nn.Module, dev: torch.device, batch: int, size: int, mode: str, repeats: int = 20) -> float:
    """Images/s of ``model`` on random pixels, timed around ``repeats`` batches after a warm-up (on a GPU
    the clock is read after synchronising). ``mode``: fp32, autocast (bf16), or bf16 (weights and input
    held in bf16, the head in float32, as `score` runs it)."""
    if mode == "bf16":
        model = copy.deepcopy(model)
        model.visual.to(torch.bfloat16)
    xs = [torch.randn(batch, 3, size, size, device=dev, dtype=torch.bfloat16 if mode == "bf16" else torch.float32)
          for _ in range(3)]
    ctx = autocast(dev) if mode == "autocast" else torch.autocast(dev.type, enabled=False)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    with torch.inference_mode(), ctx:
        for x in xs:
            model(x)
        sync()
        t = time.perf_counter()
        for i in range(repeats):
            model(xs[i % 3])
        sync()
    return batch * repeats / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    ap.add_argument("--shards", type=int, default=16)
    ap.add_argument("--per-shard", type=int, default=512)
    ap.add_argument("--skip-vit-l", action="store_true")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--device", default="cuda", help="the device under test (cpu only to try this script)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="lf-gpu-"))
    res: dict = {"torch": torch.__version__, "cuda": torch.version.cuda, "cores": os.cpu_count(),
                 "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "workers": args.workers}
    began = time.time()

    def stage(name, work):
        t = time.time()
        try:
            res[name] = work()
        except Exception:
            res[name] = {"error": traceback.format_exc()}
        res.setdefault("stage_seconds", {})[name] = round(time.time() - t, 1)
        args.out.write_text(json.dumps(res, indent=1))
        print(f"[{time.time() - began:5.0f} s] {name}: {json.dumps(res[name])[:600]}", flush=True)

    def tiny_same_scores():
        bank = resolve_bank("starter")
        urls = make_shards(tmp / "tiny", 4, 256, 256)
        [prof] = profiles_for(bank, 1, tmp / "tiny-p")
        runs = {"cpu_fp32_full": ("cpu", "fp32", "full"), "device_fp32_full": (args.device, "fp32", "full"),
                "device_bf16_full": (args.device, "bf16", "full")}  # the last: the default where bf16 is
        if args.device.startswith("cuda"):
            runs.update(device_bf16_gpu=(args.device, "bf16", "gpu"), device_fp32_gpu=(args.device, "fp32", "gpu"))
        got, r = {}, {}
        for name, (dev, precision, decode) in runs.items():
            s = score_shards(urls, [prof], tmp / f"tiny-{name}.parquet", bank=bank, progress=False,
                             cfg=ScoreConfig(workers=4, device=dev, precision=precision, decode=decode))
            got[name] = read_scores(tmp / f"tiny-{name}.parquet", "p0")
            r[name] = {k: s[k] for k in ("samples", "seconds") if k in s}
        keys = sorted(got["cpu_fp32_full"])
        a = np.array([got["cpu_fp32_full"][k] for k in keys])
        for name in [n for n in runs if n != "cpu_fp32_full"]:
            b = np.array([got[name].get(k, np.nan) for k in keys])
            r[name].update(missing=int(np.isnan(b).sum()), spearman=srocc(a, b),
                           max_abs_diff_over_range=float(np.nanmax(np.abs(a - b)) / np.ptp(a)))
        return {"rows": len(keys), **r}

    def tiny_same_fit():
        bank = resolve_bank("starter")
        urls = make_shards(tmp / "fit", 1, 10, 256, seed=5)
        pixels = decoded_pixels(urls, bank.manifest["architecture"]["preprocess"], 16)
        scores = np.array([3, 7, 5, 9, 2, 6, 4, 8, 1, 10], dtype=float)
        cfg = LearnConfig(steps=200, calibration="none", fit="backprop")
        got = {}
        for dev in ("cpu", args.device):
            torch.set_num_threads(1)
            merger = Merger(bank, torch.device(dev))
            t = time.perf_counter()
            r = fit(merger, Scored(pixels, scores), cfg)
            got[dev] = (r.alpha, (time.perf_counter() - t) / cfg.steps * 1000)
        return {"max_abs_alpha_diff": float((got["cpu"][0] - got[args.device][0]).abs().max()),
                "alpha_scale": float(got["cpu"][0].abs().max()),
                "ms_per_step": {d: round(v[1], 1) for d, v in got.items()}}

    def vit_b():
        torch.set_num_threads(os.cpu_count() or 1)
        bank = random_bank(tmp / "vitb", "ViT-B-16")
        [prof] = profiles_for(bank, 1, tmp / "vitb-p")
        dev = torch.device(args.device)
        model = load_profile(prof).model(bank).to(dev)
        r = {"batch": args.batch, "model_only": {mode: model_rate(model, dev, args.batch, 224, mode, 5 if mode == "fp32" else 20)
                                                 for mode in ("fp32", "autocast", "bf16")}}
        del model
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        preprocess = bank.manifest["architecture"]["preprocess"]
        for side, shards in ((256, args.shards), (1024, max(1, args.shards // 2))):
            urls = many_shards(tmp / f"vitb-{side}", shards, args.per_shard, args.workers, side)
            row = {"images": shards * args.per_shard,
                   "decode_only": {d: decode_only(urls, preprocess, 256, args.workers, d) for d in ("full", "scaled")}}
            for decode in ("full", "scaled", "gpu") if dev.type == "cuda" else ("full", "scaled"):
                try:
                    s = score_shards(urls, [prof], tmp / f"vitb-{side}-{decode}.parquet", bank=bank, progress=False,
                                     cfg=ScoreConfig(batch_size=args.batch, workers=args.workers, device=args.device,
                                                     decode=decode))
                    row[f"end_to_end_{decode}"] = {"images_per_s": s["samples"] / s["seconds"], "timing": s.get("timing"),
                                                   "samples": s["samples"], "scored": s["scored"]}
                except Exception:
                    row[f"end_to_end_{decode}"] = {"error": traceback.format_exc()}
            r[f"jpeg_{side}"] = row
            print(f"  ViT-B-16, {side}-pixel JPEGs: {json.dumps(row)[:400]}", flush=True)
        return r

    def vit_l():
        dev = torch.device(args.device)
        _, model = build_architecture("ViT-L-14")
        model = model.to(dev).eval()
        return {"model_only": {mode: model_rate(model, dev, args.batch, 224, mode, 5 if mode == "fp32" else 20)
                               for mode in ("fp32", "autocast", "bf16")}}

    stage("tiny_same_scores", tiny_same_scores)
    stage("tiny_same_fit", tiny_same_fit)
    stage("vit_b_16", vit_b)
    if not args.skip_vit_l:
        stage("vit_l_14", vit_l)
    print(f"done in {time.time() - began:.0f} s; {args.out}")


if __name__ == "__main__":
    main()
