"""Stage 3 of scoring: the merged models on a device, and the one loop that turns batches into part files.

``MergedModels`` holds every profile's merged model and returns scores only. ``write_batches`` is the
one loop every runner shares (the local DataLoader, each torchrun rank, each Ray actor): batches in,
rows handed to the writer, one stats record out per finished shard. ``run_local`` feeds it from a
DataLoader whose workers read and decode (``mapper``) and, on the CPU, also score.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm.auto import tqdm

from .bank import Bank
from .images import MAX_PIXELS, Preprocessor
from .log import note
from .mapper import Batch, ShardDone, shard_batches
from .model import autocast, pick_device
from .profile import Profile
from .reader import shard_name
from .writer import ShardRows


def scoring_device(name: str = "auto") -> torch.device:
    """The device to score on; an unnumbered CUDA device is torchrun's ``LOCAL_RANK`` (else 0: under Ray,
    CUDA_VISIBLE_DEVICES leaves each actor one GPU)."""
    device = pick_device(name)
    if device.type == "cuda" and device.index is None:
        device = pick_device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    return device


def default_workers() -> int:
    """One worker per core this process may use, shared with the other processes of a torchrun launch."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


class MergedModels:
    """Every profile's merged model, materialised once, in inference mode on one device."""

    def __init__(self, profiles: list[tuple[str, Profile]], bank: Bank, device: torch.device, compile: bool = False,
                 cpu_chunk: int | None = None):
        self.device = device
        self.chunk = cpu_chunk if device.type == "cpu" else None  # images per forward; None: the whole batch
        self.models = []
        for name, prof in profiles:
            m = prof.model(bank).to(device).eval()
            self.models.append((name, torch.compile(m) if compile else m))
        self.names = [n for n, _ in self.models]

    @torch.inference_mode()
    def scores(self, batch: Batch) -> dict[str, list[float | None]]:
        """One list per profile: the score of each row of the batch, None where it has no pixels."""
        n = len(batch.rows)
        out: dict[str, list[float | None]] = {name: [None] * n for name in self.names}
        if batch.pixels is not None:
            x = batch.pixels.to(self.device, non_blocking=True)
            step = self.chunk or len(x)
            for name, model in self.models:
                with autocast(self.device):
                    y = torch.cat([model(x[j:j + step]).float() for j in range(0, len(x), step)]).cpu().tolist()
                for i, v in zip(batch.index, y):
                    out[name][i] = v
        return out


def write_batches(batches: Iterable[Batch | ShardDone], models: MergedModels, out, fingerprint: str,
                  on_batch: Callable[[Batch], Any] | None = None) -> Iterator[dict[str, Any]]:
    """Batches (of any shards, interleaved) → rows in the writer; yields each shard's stats when it ends.

    A batch not yet scored (``scores`` None) is scored here. ``on_batch`` is called after each batch
    (progress; tests inject faults through it).
    """
    open_shards: dict[str, ShardRows] = {}
    for item in batches:
        rows = open_shards.get(item.url) or open_shards.setdefault(
            item.url, ShardRows(item.url, shard_name(item.url), models.names))
        if isinstance(item, ShardDone):
            del open_shards[item.url]
            yield rows.finish(out, fingerprint, item.error)
            continue
        rows.add(item.rows, item.scores if item.scores is not None else models.scores(item))
        if on_batch:
            on_batch(item)


class ShardBatches(IterableDataset):
    """This DataLoader worker's shards (every num_workers-th), batch by batch.

    With ``models`` (CPU scoring), each batch is scored in the worker and handed back with its scores
    and without pixels.
    """

    def __init__(self, urls: list[str], preprocess: dict[str, Any], batch_size: int,
                 models: MergedModels | None = None, max_pixels: int = MAX_PIXELS):
        self.urls, self.preprocess, self.batch_size, self.models = urls, preprocess, batch_size, models
        self.max_pixels = max_pixels

    def __iter__(self) -> Iterator[Batch | ShardDone]:
        info = get_worker_info()
        mine = self.urls[info.id::info.num_workers] if info else self.urls
        if info:
            torch.set_num_threads(1)  # one thread per worker process: the cores are shared
        pre = Preprocessor(self.preprocess, self.max_pixels)
        for url in mine:
            for item in shard_batches(url, pre, self.batch_size):
                if self.models is not None and isinstance(item, Batch):
                    item.scores, item.pixels = self.models.scores(item), None
                yield item


def _identity(x):
    return x


def run_local(todo: list[str], models: MergedModels, bank: Bank, out, fingerprint: str, cfg,
              summary: dict[str, Any], progress: bool = True) -> None:
    """Score ``todo`` in this process: DataLoader workers read and decode (and on the CPU score)."""
    device = models.device
    workers = min(default_workers() if cfg.workers is None else cfg.workers, len(todo))
    in_workers = models if device.type == "cpu" and workers else None  # forked workers share the weights
    dataset = ShardBatches(todo, bank.manifest["architecture"]["preprocess"], cfg.batch_size, in_workers, cfg.max_pixels)
    loader = DataLoader(dataset, batch_size=None, collate_fn=_identity, num_workers=workers,
                        pin_memory=device.type == "cuda", prefetch_factor=cfg.prefetch if workers else None,
                        persistent_workers=False)
    bar = tqdm(desc=f"score {len(todo)} shard(s)", unit="img", disable=not progress, smoothing=0.1)
    for stats in write_batches(loader, models, out, fingerprint, on_batch=lambda b: bar.update(len(b.rows))):
        add_stats(summary, stats)
    bar.close()


def add_stats(summary: dict[str, Any], stats: dict[str, Any]) -> None:
    """Count one finished shard into the run's summary."""
    summary["samples"] += stats["samples"]
    summary["scored"] += stats["ok"]
    summary["failed_samples"] += stats["samples"] - stats["ok"]
    if stats["status"] == "failed":
        summary["failed"] += 1
        summary["failed_shards"].append({"shard": stats["shard"], "error": stats["error"]})
        note(f"{stats['shard']}: shard broke after {stats['samples']} samples ({stats['error']}); "
             "its rows are kept and the next run redoes it")
    else:
        summary["done"] += 1
