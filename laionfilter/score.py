"""Scoring WebDataset shards with one or more profiles into the resumable Parquet folder.

Shards are split by rank (``--rank/--world-size`` or torchrun's ``RANK``/``WORLD_SIZE``), then by
DataLoader worker, so each sample is read exactly once. Workers read, decode and preprocess, and an
image is decoded once whatever the number of profiles. On a GPU the main process runs every profile's
merged model on each batch while the workers decode the next ones. On the CPU each worker also runs
the models on its own batches, one thread each: decoding and the model then share the cores without
the model's threads and the workers' processes preempting each other (see benchmarks/score.py). The
main process writes one part file per shard.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm.auto import tqdm

from .bank import Bank
from .errors import LaionfilterError
from .images import MAX_PIXELS, ImageDecodeError, Preprocessor, decode
from .log import note
from .names import check_distinct, check_name
from .profile import Profile, load_profile
from .reader import IMAGE_EXTS, Sample, ShardEnd, read_shard, shard_name
from .safefiles import file_sha256
from .shards import expand_shards
from .writer import FIXED_COLUMNS, ShardRows, prepare_output, shard_done


@dataclass(frozen=True)
class ScoreConfig:
    batch_size: int = 256
    workers: int | None = None  # DataLoader worker processes (0: read in the main process; None: default_workers())
    device: str = "auto"
    compile: bool = False
    overwrite: bool = False
    rank: int | None = None  # None: from RANK, else 0
    world_size: int | None = None  # None: from WORLD_SIZE, else 1
    prefetch: int = 4  # batches per worker in flight
    # Images per forward on the CPU: a batch of 256 spills the caches (the tiny ViT on one thread:
    # 1.8k img/s in chunks of 32, 1.1k in one forward of 256).
    cpu_chunk: int = 32
    distributor: str = "local"  # local, or ray: one Ray task per shard
    ray_address: str | None = None  # None: start or join the local Ray instance; "auto": the running cluster
    ray_actors: int | None = None  # None: one per GPU (or CPU) of the cluster
    max_pixels: int = MAX_PIXELS  # larger images get status 'bomb'
    allow_pipe: bool = False  # run pipe: lines of a shard list file

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def rank_and_world(cfg: ScoreConfig) -> tuple[int, int]:
    rank = cfg.rank if cfg.rank is not None else int(os.environ.get("RANK", 0))
    world = cfg.world_size if cfg.world_size is not None else int(os.environ.get("WORLD_SIZE", 1))
    if world < 1 or not 0 <= rank < world:
        raise LaionfilterError(f"rank {rank} is not within world size {world}")
    return rank, world


def default_workers() -> int:
    """One worker per core this process may use, shared with the other processes of a torchrun launch."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def sample_row(sample: Sample, shard: str, pre: Preprocessor) -> tuple[dict[str, Any], torch.Tensor | None]:
    """One output row (without scores) and the preprocessed pixels, or None with a status and error."""
    meta = sample.meta()
    row = {"key": sample.key, "shard": shard, "url": meta.get("url"), "caption": meta.get("caption"),
           "width": meta.get("width"), "height": meta.get("height"), "status": "ok", "error": None}
    image = sample.image
    if image is None:
        other = sorted(e for e in sample.files if not e.startswith("__"))
        row["status"], row["error"] = "no_image", f"no {'/'.join(IMAGE_EXTS)} in sample (has: {', '.join(other) or 'nothing'})"
        return row, None
    try:
        pixels = decode(image[1], pre.max_pixels)
    except ImageDecodeError as e:
        row["status"], row["error"] = e.kind, str(e)[:500]
        return row, None
    row["height"], row["width"] = int(pixels.shape[-2]), int(pixels.shape[-1])
    return row, pre(pixels)


def shard_batches(url: str, pre: Preprocessor, batch_size: int) -> Iterator[dict[str, Any]]:
    """Batches of one shard's decoded samples (a batch never spans shards), then its end marker."""
    name = shard_name(url)
    rows, pixels, index = [], [], []

    def batch() -> dict[str, Any]:
        return {"url": url, "end": False, "rows": rows, "index": index,
                "pixels": torch.stack(pixels) if pixels else None}

    for item in read_shard(url):
        if isinstance(item, ShardEnd):
            if rows:
                yield batch()
            yield {"url": url, "end": True, "error": item.error}
            return
        row, px = sample_row(item, name, pre)
        if px is not None:
            index.append(len(rows))
            pixels.append(px)
        rows.append(row)
        if len(rows) == batch_size:
            yield batch()
            rows, pixels, index = [], [], []


class ShardBatches(IterableDataset):
    """This DataLoader worker's shards (every num_workers-th), batch by batch.

    With ``models`` (CPU scoring), each batch is scored in the worker and carries its output
    ``columns`` instead of pixels.
    """

    def __init__(self, urls: list[str], preprocess: dict[str, Any], batch_size: int,
                 models: "MergedModels | None" = None, max_pixels: int = MAX_PIXELS):
        self.urls, self.preprocess, self.batch_size, self.models = urls, preprocess, batch_size, models
        self.max_pixels = max_pixels

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        mine = self.urls[info.id::info.num_workers] if info else self.urls
        if info:
            torch.set_num_threads(1)  # one thread per worker process: the cores are shared
        pre = Preprocessor(self.preprocess, self.max_pixels)
        for url in mine:
            for batch in shard_batches(url, pre, self.batch_size):
                if self.models is not None and not batch["end"]:
                    batch = {"url": url, "end": False, "columns": self.models.rows(batch)}
                yield batch


class MergedModels:
    """Every profile's merged model, materialised once, in inference mode on one device."""

    def __init__(self, profiles: list[tuple[str, Profile]], bank: Bank, device: torch.device, compile: bool = False,
                 cpu_chunk: int | None = None):
        from .model import autocast

        self.device, self._autocast = device, autocast
        self.chunk = cpu_chunk if device.type == "cpu" else None  # images per forward; None: the whole batch
        self.models = []
        for name, prof in profiles:
            m = prof.model(bank).to(device).eval()
            self.models.append((name, torch.compile(m) if compile else m))
        self.names = [n for n, _ in self.models]

    @torch.inference_mode()
    def rows(self, batch: dict[str, Any]) -> dict[str, list]:
        """The batch's output columns: its rows' fields and one score column per profile."""
        n = len(batch["rows"])
        scores = {name: [None] * n for name in self.names}
        if batch["pixels"] is not None:
            x = batch["pixels"].to(self.device, non_blocking=True)
            step = self.chunk or len(x)
            for name, model in self.models:
                with self._autocast(self.device):
                    y = torch.cat([model(x[j:j + step]).float() for j in range(0, len(x), step)]).cpu().tolist()
                for i, v in zip(batch["index"], y):
                    scores[name][i] = v
        return {**{c: [r[c] for r in batch["rows"]] for c in FIXED_COLUMNS}, **scores}


def _identity(x):
    return x


def _profile_files(spec: str | os.PathLike) -> list[tuple[str | None, Path]]:
    """``NAME=PATH`` or ``PATH`` (a file, or a folder of *.profile files) → (column name or None, file)."""
    text = str(spec)
    name, sep, rest = text.partition("=")
    if sep and not Path(text).exists():
        if Path(rest).is_dir():
            raise LaionfilterError(f"--profile {text}: NAME=PATH names one profile file, not a folder")
        return [(check_name(name, "column name", f"--profile {text}"), Path(rest))]
    p = Path(text)
    if p.is_dir():
        found = sorted(p.glob("*.profile"))
        if not found:
            raise LaionfilterError(f"{p}: folder holds no .profile files")
        return [(None, f) for f in found]
    if not p.is_file():
        raise LaionfilterError(f"{p}: no such profile file or folder")
    return [(None, p)]


def resolve_profiles(specs: list[str | os.PathLike]) -> list[tuple[str, Profile, Path]]:
    """(score column, profile, file) for each ``--profile``; a column is named by ``NAME=`` or the file's
    name (``alice.profile`` → ``alice``), never by what the file says inside."""
    files = [item for spec in specs for item in _profile_files(spec)]
    if not files:
        raise LaionfilterError("give at least one --profile")
    out = []
    for name, f in files:
        column = name or check_name(f.name.removesuffix(".profile"), "profile file name", f"{f} (use --profile NAME={f})")
        out.append((column, load_profile(f), f))
    check_distinct([c for c, _, _ in out] + FIXED_COLUMNS, "score columns (name them with --profile NAME=PATH)")
    return out


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


def score_shards(shards: str | list[str], profiles: list[str | os.PathLike], out: str | os.PathLike,
                 bank: str | os.PathLike | Bank | None = None, cfg: ScoreConfig = ScoreConfig(),
                 progress: bool = True) -> dict[str, Any]:
    """Score every sample of the shards with every profile; returns the run's summary."""
    from .model import pick_device

    out = Path(out)
    loaded = resolve_profiles(profiles)
    named = [(column, prof) for column, prof, _ in loaded]
    the_bank = bank if isinstance(bank, Bank) else loaded[0][1].find_bank(loaded[0][2], bank)
    for _, prof, path in loaded:
        prof.check_bank(the_bank, path)  # refuse before any work
    if cfg.distributor not in ("local", "ray"):
        raise LaionfilterError(f"distributor must be local or ray, not {cfg.distributor!r}")
    device = pick_device(cfg.device) if cfg.distributor == "local" else None
    if device is not None and device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = pick_device(f"cuda:{int(os.environ['LOCAL_RANK'])}")  # torchrun: one process per GPU
    rank, world = rank_and_world(cfg)
    urls = shards if isinstance(shards, list) else expand_shards(shards, cfg.allow_pipe)
    mine = urls[rank::world]
    manifest = {
        "bank": {"fingerprint": the_bank.fingerprint, "path": str(the_bank.path)},
        "profiles": [{"name": column, "sha256": file_sha256(f).hexdigest(), "path": str(f), "learned_as": p.name}
                     for column, p, f in loaded],
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

    summary = {"columns": {column: str(f) for column, _, f in loaded}, "shards": len(mine), "skipped": skipped,
               "done": 0, "failed": 0, "samples": 0, "scored": 0,
               "failed_samples": 0, "failed_shards": [], "seconds": 0.0}
    started = time.time()
    if todo and cfg.distributor == "ray":
        from .distribute import score_with_ray

        local = [u if u.startswith("pipe:") or "://" in u else str(Path(u).resolve()) for u in todo]  # for other cwds
        score_with_ray(local, [(column, f.resolve()) for column, _, f in loaded], the_bank.path.resolve(),
                       out.resolve(), fingerprint, cfg, summary, progress)
    elif todo:
        models = MergedModels(named, the_bank, device, cfg.compile, cfg.cpu_chunk)
        prof_names = models.names
        workers = min(default_workers() if cfg.workers is None else cfg.workers, len(todo))
        in_workers = models if device.type == "cpu" and workers else None  # forked workers share the weights
        loader = DataLoader(ShardBatches(todo, the_bank.manifest["architecture"]["preprocess"], cfg.batch_size,
                                         in_workers, cfg.max_pixels),
                            batch_size=None, collate_fn=_identity, num_workers=workers,
                            pin_memory=device.type == "cuda", prefetch_factor=cfg.prefetch if workers else None,
                            persistent_workers=False)
        open_shards: dict[str, ShardRows] = {}
        bar = tqdm(desc=f"score {len(todo)} shard(s)", unit="img", disable=not progress, smoothing=0.1)
        for batch in loader:
            url = batch["url"]
            rows = open_shards.setdefault(url, ShardRows(url, shard_name(url), prof_names))
            if batch["end"]:
                add_stats(summary, rows.finish(out, fingerprint, batch["error"]))
                del open_shards[url]
                continue
            columns = batch["columns"] if "columns" in batch else models.rows(batch)
            rows.add(columns)
            bar.update(len(columns["key"]))
        bar.close()
    summary["seconds"] = round(time.time() - started, 2)
    summary["images_per_second"] = round(summary["samples"] / summary["seconds"], 1) if summary["seconds"] else 0.0
    return summary
