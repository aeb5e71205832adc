"""Scoring throughput, measured side by side in one run on the same shards and models.

For each model (the starter bank's tiny ViT, and ViT-B-16 with random weights):
  (a) model-only: the merged model's forward on pre-decoded, preprocessed tensors,
  (b) decode-only: reading, decoding and preprocessing the shards in the same DataLoader workers,
      which hand back only counts (CPU scoring's workers hand back only scores),
  (c) end-to-end: `score_shards` (model building and worker start-up included), and its ratio to
      the serial bound 1 / (1/a + 1/b) (on a CPU decoding and the model share the cores; on a GPU the
      bound is min(a, b)). (a) runs with torch's default threads (one per core), (b) and (c) with
      one worker per core, one thread each.
Then K profiles in one pass against K separate passes (tiny model), and the resident memory of a
process scoring many shards, shard after shard.

    python benchmarks/score.py                 # about 3 minutes on 2 cores
    python benchmarks/score.py --skip-vit-b    # the tiny model only
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from laionfilter.bank import build_bank
from laionfilter.train.finetune import FinetuneConfig, StageConfig, finetune
from laionfilter.profile import Profile, PROFILE_FORMAT
from laionfilter.score import ScoreConfig, score_shards
from laionfilter.mapper import Batch
from laionfilter.scorer import ShardBatches, cpu_chunk_for, default_workers
from laionfilter.bank import resolve_bank
from laionfilter.train.starter import PHOTOS, load_photo, random_crop


def make_shards(root: Path, shards: int, per_shard: int, size: int, seed: int = 0) -> list[str]:
    """JPEG shards like img2dataset's (shorter side ``size``) from the bank's unseen photos."""
    rng = np.random.default_rng(seed)
    photos = [load_photo(n) for n in PHOTOS["eval"]]
    root.mkdir(parents=True, exist_ok=True)
    urls = []
    for s in range(shards):
        path = root / f"{s:05d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for i in range(per_shard):
                img = random_crop(photos[(s + i) % len(photos)], size, rng)
                img = img.resize((int(size * rng.uniform(1.0, 1.5)), size))
                buf = io.BytesIO()
                img.save(buf, "JPEG", quality=90)
                key = f"{s:05d}{i:04d}"
                sink.write({"__key__": key, "jpg": buf.getvalue(),
                            "json": json.dumps({"url": f"https://example.com/{key}.jpg", "caption": key}).encode()})
        urls.append(str(path))
    return urls


def profiles_for(bank, k: int, root: Path) -> list[Path]:
    """K profiles with distinct random coefficients (throughput does not depend on their values)."""
    out = []
    g = torch.Generator().manual_seed(k)
    for j in range(k):
        alpha = torch.rand(bank.n, len(bank.layers), generator=g) / bank.n
        meta = {"format": PROFILE_FORMAT, "name": f"p{j}", "bank": {"fingerprint": bank.fingerprint, "path": str(bank.path)},
                "tasks": [t["name"] for t in bank.tasks], "layers": len(bank.layers)}
        out.append(Profile(alpha, meta).save(root / f"p{j}.profile"))
    return out


def random_bank(root: Path, base: str = "ViT-B-16"):
    """A two-task bank of ``base`` from random weights (phase 1 with zero steps: τ = 0, shapes real)."""
    table = root / "db.csv"
    img_dir = root / "db"
    img_dir.mkdir(parents=True, exist_ok=True)
    rows = ["image,score,split"]
    for i in range(4):
        random_crop(load_photo("coffee"), 224, np.random.default_rng(i)).save(img_dir / f"{i}.png")
        rows.append(f"db/{i}.png,{2 + i},{'val' if i % 2 else 'train'}")
    table.write_text("\n".join(rows) + "\n")
    tasks = []
    for name in ("a", "b"):
        cfg = FinetuneConfig(database=str(table), base=base, name=name, device="cpu", workers=0,
                             head=StageConfig(0, 2, 1e-5, 1e-6), backbone=StageConfig(0, 2, 1e-6, 1e-7), checkpoint_every=0)
        finetune(cfg, root / f"{name}.safetensors", progress=False)
        tasks.append(root / f"{name}.safetensors")
    return build_bank(tasks, root / "bank")


def model_only(bank, profile: Path, pixels: torch.Tensor, batch: int) -> float:
    from laionfilter.profile import load_profile

    model = load_profile(profile).model(bank)
    step = min(batch, cpu_chunk_for(bank.architecture))  # the forward size CPU scoring uses
    with torch.inference_mode():
        model(pixels[:step])  # warm-up
        t = time.perf_counter()
        for i in range(0, len(pixels), step):
            model(pixels[i:i + step])
    return len(pixels) / (time.perf_counter() - t)


class DecodeOnly(ShardBatches):
    """Read, decode and preprocess in the workers, handing back only the count, as CPU scoring does."""

    def __iter__(self):
        for b in super().__iter__():
            yield len(b.rows) if isinstance(b, Batch) else 0


def decode_only(urls: list[str], preprocess: dict, batch: int, workers: int, decode: str = "scaled") -> float:
    from torch.utils.data import DataLoader

    loader = DataLoader(DecodeOnly(urls, preprocess, batch, decode=decode), batch_size=None, collate_fn=lambda x: x,
                        num_workers=workers, prefetch_factor=4 if workers else None)
    t = time.perf_counter()
    n = sum(loader)
    return n / (time.perf_counter() - t)


def decoded_pixels(urls: list[str], preprocess: dict, batch: int) -> torch.Tensor:
    """The shards' preprocessed images, normalised, for the model-only measurement (untimed)."""
    from laionfilter.images import Preprocessor

    cropped = torch.cat([b.pixels for b in ShardBatches(urls, preprocess, batch) if isinstance(b, Batch)])
    return Preprocessor(preprocess).normalise(cropped)


def end_to_end(urls, profiles, bank, out: Path, batch: int, workers: int) -> float:
    s = score_shards(urls, profiles, out, bank=bank, cfg=ScoreConfig(batch_size=batch, workers=workers, device="cpu",
                                                                     overwrite=True), progress=False)
    return s["samples"] / s["seconds"]


def median_of(runs: int, measure) -> float:
    return float(np.median([measure() for _ in range(runs)]))


def seconds(work) -> float:
    t = time.perf_counter()
    work()
    return time.perf_counter() - t


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=default_workers())
    ap.add_argument("--skip-vit-b", action="store_true")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="lf-bench-"))
    print(f"threads: torch {torch.get_num_threads()}, DataLoader workers {args.workers}, cores {os.cpu_count()}")
    # (label, bank, shards, images per shard, batch, repeats): a run of the tiny model takes seconds and
    # varies by ±10 % here, so each of its three rates is the median of 3 runs.
    setups = [("tiny (starter bank, 64 px)", resolve_bank("starter"), 8, 256, 256, 3)]
    if not args.skip_vit_b:
        setups.append(("ViT-B-16 random (224 px)", random_bank(tmp / "vitb"), 4, 48, 32, 1))
    for n, (label, bank, n_shards, per_shard, batch, repeats) in enumerate(setups):
        urls = make_shards(tmp / f"shards-{n}", n_shards, per_shard, 256)
        [prof] = profiles_for(bank, 1, tmp)
        preprocess = bank.manifest["architecture"]["preprocess"]
        pixels = decoded_pixels(urls, preprocess, batch)
        dec = median_of(repeats, lambda: decode_only(urls, preprocess, batch, args.workers))
        mod = median_of(repeats, lambda: model_only(bank, prof, pixels, batch))
        e2e = median_of(repeats, lambda: end_to_end(urls, [prof], bank, tmp / "out", batch, args.workers))
        bound = 1 / (1 / mod + 1 / dec)
        print(f"{label}, {len(pixels)} images: model-only {mod:.3g} img/s, decode-only {dec:.3g} img/s, "
              f"end-to-end {e2e:.3g} img/s, serial bound {bound:.3g} img/s, end-to-end / bound = {e2e / bound:.2f}")

    bank = resolve_bank("starter")
    urls = make_shards(tmp / "shards-k", 8, 160, 256, seed=1)
    # Single runs vary by ±10 % here, so the one-pass time and the decoding time are medians of 3;
    # the K separate passes are K runs already.
    decode_s = median_of(3, lambda: 1280 / decode_only(urls, bank.manifest["architecture"]["preprocess"], 256,
                                                       args.workers))
    for k in (1, 4, 8):
        profs = profiles_for(bank, k, tmp / f"k{k}")
        one_s = median_of(3, lambda: seconds(lambda: end_to_end(urls, profs, bank, tmp / f"one{k}", 256, args.workers)))
        sep_s = seconds(lambda: [end_to_end(urls, [p], bank, tmp / f"sep{k}-{p.stem}", 256, args.workers) for p in profs])
        print(f"K={k}: one pass {one_s:.2f} s, {k} passes {sep_s:.2f} s (ratio {sep_s / one_s:.2f}); saved "
              f"{sep_s - one_s:.2f} s against {(k - 1) * decode_s:.2f} s of repeated decoding ({k - 1} × {decode_s:.2f} s)")

    urls = make_shards(tmp / "shards-mem", 40, 16, 256, seed=2)
    [prof] = profiles_for(bank, 1, tmp / "mem")
    marks = []
    for i in range(0, 40, 10):
        score_shards(urls[i:i + 10], [prof], tmp / "mem-out", bank=bank,
                     cfg=ScoreConfig(batch_size=64, workers=0, device="cpu"), progress=False)
        marks.append(rss_mib())
    print("resident memory after 10, 20, 30, 40 shards (MiB): " + ", ".join(f"{m:.0f}" for m in marks))


if __name__ == "__main__":
    main()
