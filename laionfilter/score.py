"""Scoring WebDataset shards with one or more profiles into the resumable Parquet folder: the run.

The stages: ``reader`` (tar → samples) → ``mapper`` (samples → decoded batches and rows) → ``scorer``
(merged models → scores; the one loop every runner shares) → ``writer`` (rows → Parquet parts, stats,
manifest). This module plans a run (profiles → score columns, the bank, the manifest, the shards still
to do) and hands it to a runner: ``scorer.run_local`` or ``distribute.run_ray``.

Shards are split by rank (``--rank/--world-size`` or torchrun's ``RANK``/``WORLD_SIZE``), then by
DataLoader worker, so each sample is read exactly once. Workers read, decode and preprocess, and an
image is decoded once whatever the number of profiles. On a GPU the main process runs every profile's
merged model on each batch while the workers decode the next ones. On the CPU each worker also runs
the models on its own batches, one thread each: decoding and the model then share the cores without
the model's threads and the workers' processes preempting each other (see benchmarks/score.py). The
main process writes one part file per shard.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .bank import Bank
from .errors import LaionfilterError
from .images import MAX_PIXELS
from .log import note
from .names import check_distinct, check_name
from .profile import Profile, load_profile
from .reader import ImageChunk, shard_name
from .safefiles import file_sha256
from .shards import expand_sources, is_remote
from .writer import FIXED_COLUMNS, prepare_output, rating_column, rating_columns, shard_done


@dataclass(frozen=True)
class ScoreConfig:
    batch_size: int = 256
    workers: int | None = None  # DataLoader worker processes (0: read in the main process; None: default_workers())
    device: str = "auto"
    compile: bool = False
    precision: str = "auto"  # the towers' weights: fp32, bf16, or auto (bf16 where the GPU or CPU has it)
    decode: str = "full"  # full, scaled (large JPEGs at a reduced DCT scale) or gpu (nvJPEG): scorer.DECODES
    overwrite: bool = False
    rank: int | None = None  # None: from RANK, else 0
    world_size: int | None = None  # None: from WORLD_SIZE, else 1
    prefetch: int = 4  # batches per worker in flight
    cpu_chunk: int | None = None  # images per forward on the CPU; None: scorer.cpu_chunk_for the bank
    distributor: str = "local"  # local, or ray: one Ray task per shard
    ray_address: str | None = None  # None: start or join the local Ray instance; "auto": the running cluster
    ray_actors: int | None = None  # None: one per GPU (or CPU) of the cluster
    max_pixels: int = MAX_PIXELS  # larger images get status 'bomb'
    allow_pipe: bool = False  # let pipe: shard URLs run their shell commands

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def rank_and_world(cfg: ScoreConfig) -> tuple[int, int]:
    rank = cfg.rank if cfg.rank is not None else int(os.environ.get("RANK", 0))
    world = cfg.world_size if cfg.world_size is not None else int(os.environ.get("WORLD_SIZE", 1))
    if world < 1 or not 0 <= rank < world:
        raise LaionfilterError(f"rank {rank} is not within world size {world}")
    return rank, world


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
    # Every profile's rating name is reserved, calibrated or not: a column x_rating beside x would read
    # as x's ratings to anything that looks at the scores later.
    ratings = [rating_column(c) for c, _, _ in out]
    check_distinct([c for c, _, _ in out] + ratings + FIXED_COLUMNS, "score columns (name them with --profile NAME=PATH)")
    return out


def score_shards(shards: str | list[str], profiles: list[str | os.PathLike], out: str | os.PathLike,
                 bank: str | os.PathLike | Bank | None = None, cfg: ScoreConfig = ScoreConfig(),
                 progress: bool = True) -> dict[str, Any]:
    """Score every sample of the shards with every profile; returns the run's summary (with ``timing``:
    planning, building the models, the wait for the first batch and the streaming loop, in seconds)."""
    planned = time.time()
    out = Path(out)
    loaded = resolve_profiles(profiles)
    named = [(column, prof) for column, prof, _ in loaded]
    the_bank = bank if isinstance(bank, Bank) else loaded[0][1].find_bank(loaded[0][2], bank)
    for _, prof, path in loaded:
        prof.check_bank(the_bank, path)  # refuse before any work
    if cfg.distributor not in ("local", "ray"):
        raise LaionfilterError(f"distributor must be local or ray, not {cfg.distributor!r}")
    if cfg.distributor == "local":
        from .devices import resolve_precision
        from .scorer import check_decode, scoring_device

        device = scoring_device(cfg.device)  # refuse a missing GPU, or options it cannot take, before any work
        check_decode(cfg.decode, device)
        resolve_precision(cfg.precision, device)
    rank, world = rank_and_world(cfg)
    urls = shards if isinstance(shards, list) else expand_sources(shards, cfg.allow_pipe)
    mine = urls[rank::world]
    chunks = [u for u in urls if isinstance(u, ImageChunk)]
    manifest = {
        "bank": {"fingerprint": the_bank.fingerprint, "path": str(the_bank.path)},
        "profiles": [{"name": column, "sha256": file_sha256(f).hexdigest(), "path": str(f), "learned_as": p.name}
                     for column, p, f in loaded],
        "preprocess": the_bank.manifest["architecture"]["preprocess"],
        "options": {**cfg.to_json(), "rank": rank, "world_size": world},
    }
    if chunks:  # which image went to which part: a rerun over a changed folder is another run
        listing = "\n".join(f"{c.name}\t{f}" for c in chunks for f in c.files)
        manifest["images"] = {"root": chunks[0].root, "count": sum(len(c.files) for c in chunks),
                              "sha256": hashlib.sha256(listing.encode()).hexdigest()}
    fingerprint = prepare_output(out, manifest, cfg.overwrite)
    todo = [u for u in mine if cfg.overwrite or not shard_done(out, shard_name(u), fingerprint)]
    names = [shard_name(u) for u in urls]
    if len(set(names)) != len(names):
        raise LaionfilterError("two shards share a file name; their part files would collide")
    skipped = len(mine) - len(todo)
    if skipped:
        note(f"{out}: {skipped} shard(s) already done, skipping them")

    summary = {"columns": {column: str(f) for column, _, f in loaded},
               "rating_columns": rating_columns(named),
               "shards": len(mine), "skipped": skipped,
               "done": 0, "failed": 0, "samples": 0, "scored": 0,
               "failed_samples": 0, "failed_shards": [], "seconds": 0.0,
               "timing": {"plan_s": round(time.time() - planned, 3)}}
    started = time.time()
    if todo and cfg.distributor == "ray":
        from .distribute import run_ray

        local = [u if isinstance(u, ImageChunk) or is_remote(u) else str(Path(u).resolve()) for u in todo]  # other cwds
        run_ray(local, [(column, f.resolve()) for column, _, f in loaded], the_bank.path.resolve(), out.resolve(),
                fingerprint, cfg, summary, progress)
    elif todo:
        from .scorer import MergedModels, run_local

        models = MergedModels(named, the_bank, device, cfg.compile, cfg.cpu_chunk, cfg.precision)
        summary["timing"]["models_s"] = round(time.time() - started, 3)
        run_local(todo, models, the_bank, out, fingerprint, cfg, summary, progress)
    summary["seconds"] = round(time.time() - started, 2)
    summary["images_per_second"] = round(summary["samples"] / summary["seconds"], 1) if summary["seconds"] else 0.0
    return summary
