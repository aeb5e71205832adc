"""Scoring WebDataset shards with one or more profiles into the resumable Parquet folder.

Shards are split by rank (``--rank/--world-size`` or torchrun's ``RANK``/``WORLD_SIZE``), then by
DataLoader worker, so each sample is read exactly once. Workers read, decode and preprocess; the main
process runs every profile's merged model on each batch (an image is decoded once, whatever the
number of profiles) and writes one part file per shard.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm.auto import tqdm

from .bank import Bank, load_bank
from .errors import LaionfilterError
from .images import ImageDecodeError, Preprocessor, decode
from .log import note
from .profile import Profile, load_profile
from .reader import Sample, ShardEnd, read_shard, shard_name
from .safefiles import file_sha256
from .shards import expand_shards
from .writer import FIXED_COLUMNS, ShardRows, prepare_output, shard_done


@dataclass(frozen=True)
class ScoreConfig:
    batch_size: int = 256
    workers: int = 4  # DataLoader worker processes (0: read in the main process)
    device: str = "auto"
    compile: bool = False
    overwrite: bool = False
    rank: int | None = None  # None: from RANK, else 0
    world_size: int | None = None  # None: from WORLD_SIZE, else 1
    prefetch: int = 4  # batches per worker in flight

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def rank_and_world(cfg: ScoreConfig) -> tuple[int, int]:
    rank = cfg.rank if cfg.rank is not None else int(os.environ.get("RANK", 0))
    world = cfg.world_size if cfg.world_size is not None else int(os.environ.get("WORLD_SIZE", 1))
    if world < 1 or not 0 <= rank < world:
        raise LaionfilterError(f"rank {rank} is not within world size {world}")
    return rank, world


def sample_row(sample: Sample, shard: str, pre: Preprocessor) -> tuple[dict[str, Any], torch.Tensor | None]:
    """One output row (without scores) and the preprocessed pixels, or None with a status and error."""
    meta = sample.meta()
    row = {"key": sample.key, "shard": shard, "url": meta.get("url"), "caption": meta.get("caption"),
           "width": meta.get("width"), "height": meta.get("height"), "status": "ok", "error": None}
    image = sample.image
    if image is None:
        other = sorted(e for e in sample.files if not e.startswith("__"))
        row["status"], row["error"] = "no_image", f"no jpg/jpeg/png/webp in sample (has: {', '.join(other) or 'nothing'})"
        return row, None
    try:
        pixels = decode(image[1])
    except ImageDecodeError as e:
        row["status"], row["error"] = e.kind, str(e)[:500]
        return row, None
    row["height"], row["width"] = int(pixels.shape[-2]), int(pixels.shape[-1])
    return row, pre(pixels)


class ShardBatches(IterableDataset):
    """Batches of decoded samples from this worker's shards, each batch from one shard, then a ShardEnd."""

    def __init__(self, urls: list[str], preprocess: dict[str, Any], batch_size: int):
        self.urls, self.preprocess, self.batch_size = urls, preprocess, batch_size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        mine = self.urls[info.id::info.num_workers] if info else self.urls
        pre = Preprocessor(self.preprocess)
        torch.set_num_threads(1)  # decoding workers: one thread each, the cores are shared
        for url in mine:
            name = shard_name(url)
            rows, pixels, index = [], [], []
            for item in read_shard(url):
                if isinstance(item, ShardEnd):
                    if rows:
                        yield self._batch(url, rows, pixels, index)
                    yield {"url": url, "end": True, "error": item.error}
                    break
                row, px = sample_row(item, name, pre)
                if px is not None:
                    index.append(len(rows))
                    pixels.append(px)
                rows.append(row)
                if len(rows) == self.batch_size:
                    yield self._batch(url, rows, pixels, index)
                    rows, pixels, index = [], [], []

    @staticmethod
    def _batch(url, rows, pixels, index) -> dict[str, Any]:
        return {"url": url, "end": False, "rows": rows, "index": index,
                "pixels": torch.stack(pixels) if pixels else None}


def _identity(x):
    return x


def resolve_profiles(paths: list[str | os.PathLike]) -> list[tuple[Path, Profile]]:
    """Profile files, with folders expanded to the *.profile files they hold."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(p.glob("*.profile"))
            if not found:
                raise LaionfilterError(f"{p}: folder holds no .profile files")
            files.extend(found)
        else:
            files.append(p)
    if not files:
        raise LaionfilterError("give at least one --profile")
    out = [(f, load_profile(f)) for f in files]
    names = [p.name for _, p in out]
    clash = sorted({n for n in names if names.count(n) > 1} | (set(names) & set(FIXED_COLUMNS)))
    if clash:
        raise LaionfilterError(f"profile names {clash} repeat or clash with output columns; rename the profile files' users")
    return out


def score_shards(shards: str | list[str], profiles: list[str | os.PathLike], out: str | os.PathLike,
                 bank: str | os.PathLike | Bank | None = None, cfg: ScoreConfig = ScoreConfig(),
                 progress: bool = True) -> dict[str, Any]:
    """Score every sample of the shards with every profile; returns the run's summary."""
    from .model import pick_device, autocast

    out = Path(out)
    loaded = resolve_profiles(profiles)
    if isinstance(bank, Bank):
        the_bank = bank
    else:
        from .starter import resolve_bank

        the_bank = resolve_bank(bank) if bank else load_bank(loaded[0][1].meta["bank"]["path"])
    for path, prof in loaded:
        prof.check_bank(the_bank, path)  # refuse before any work
    device = pick_device(cfg.device)
    rank, world = rank_and_world(cfg)
    urls = shards if isinstance(shards, list) else expand_shards(shards)
    mine = urls[rank::world]
    manifest = {
        "bank": {"fingerprint": the_bank.fingerprint, "path": str(the_bank.path)},
        "profiles": [{"name": p.name, "sha256": file_sha256(f).hexdigest(), "path": str(f)} for f, p in loaded],
        "preprocess": the_bank.manifest["architecture"]["preprocess"],
        "options": {**cfg.to_json(), "rank": rank, "world_size": world},
    }
    fingerprint = prepare_output(out, manifest, cfg.overwrite)
    todo = [u for u in mine if cfg.overwrite or not shard_done(out, shard_name(u), fingerprint)]
    names = [shard_name(u) for u in urls]
    if len(set(names)) != len(names):
        raise LaionfilterError("two shards share a file name; their part files would collide")
    skipped = len(mine) - len(todo)
    if skipped:
        note(f"{out}: {skipped} shard(s) already done, skipping them")

    models = []
    for _, prof in loaded:
        m = prof.model(the_bank).to(device).eval()
        models.append((prof.name, torch.compile(m) if cfg.compile else m))
    prof_names = [n for n, _ in models]
    summary = {"shards": len(mine), "skipped": skipped, "done": 0, "failed": 0, "samples": 0, "scored": 0,
               "failed_samples": 0, "failed_shards": [], "seconds": 0.0}
    started = time.time()
    if todo:
        workers = min(cfg.workers, len(todo))
        loader = DataLoader(ShardBatches(todo, the_bank.manifest["architecture"]["preprocess"], cfg.batch_size),
                            batch_size=None, collate_fn=_identity, num_workers=workers,
                            pin_memory=device.type == "cuda", prefetch_factor=cfg.prefetch if workers else None,
                            persistent_workers=False)
        open_shards: dict[str, ShardRows] = {}
        bar = tqdm(desc=f"score {len(todo)} shard(s)", unit="img", disable=not progress, smoothing=0.1)
        with torch.inference_mode():
            for batch in loader:
                url = batch["url"]
                rows = open_shards.setdefault(url, ShardRows(url, shard_name(url), prof_names))
                if batch["end"]:
                    stats = rows.finish(out, fingerprint, batch["error"])
                    del open_shards[url]
                    summary["samples"] += stats["samples"]
                    summary["scored"] += stats["ok"]
                    summary["failed_samples"] += stats["samples"] - stats["ok"]
                    if batch["error"]:
                        summary["failed"] += 1
                        summary["failed_shards"].append({"shard": url, "error": batch["error"]})
                        note(f"{url}: shard broke after {stats['samples']} samples ({batch['error']}); "
                             "its rows are kept and the next run redoes it")
                    else:
                        summary["done"] += 1
                    continue
                n = len(batch["rows"])
                scores = {name: [None] * n for name in prof_names}
                if batch["pixels"] is not None:
                    x = batch["pixels"].to(device, non_blocking=True)
                    for name, model in models:
                        with autocast(device):
                            y = model(x).float().cpu().tolist()
                        for i, v in zip(batch["index"], y):
                            scores[name][i] = v
                cols = {c: [r[c] for r in batch["rows"]] for c in FIXED_COLUMNS}
                rows.add({**cols, **scores})
                bar.update(n)
        bar.close()
    summary["seconds"] = round(time.time() - started, 2)
    summary["images_per_second"] = round(summary["samples"] / summary["seconds"], 1) if summary["seconds"] else 0.0
    return summary
