"""Phase-1 databases: an image→score table, or WebDataset shards with the score in each sample's json.

A table may carry a ``split`` column (``train``/``val``) to fix the held-out split, e.g. so that no
source photo is on both sides; otherwise a seeded fraction of rows is held out.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset

from ..errors import LaionfilterError
from ..images import ImageDecodeError
from ..ratings import parse_score
from ..tables import read_table, require_columns, resolve_path


@dataclass(frozen=True)
class ScoreRange:
    """Maps a database's raw scores linearly onto the template's range (e.g. SPAQ's 0–100 onto 1–10)."""

    low: float
    high: float


def _check_scores(scores: np.ndarray, path, template: tuple[float, ...], raw_range: ScoreRange | None) -> np.ndarray:
    lo, hi = template[0], template[-1]
    if raw_range is not None:
        out = (scores - raw_range.low) / (raw_range.high - raw_range.low)
        bad = np.flatnonzero((out < -1e-9) | (out > 1 + 1e-9))
        if len(bad):
            raise LaionfilterError(
                f"{path}: {len(bad)} score(s) outside --score-range {raw_range.low}..{raw_range.high} "
                f"(first at row {bad[0] + 1}: {scores[bad[0]]})"
            )
        return lo + out * (hi - lo)
    bad = np.flatnonzero((scores < lo - 1e-9) | (scores > hi + 1e-9))
    if len(bad):
        raise LaionfilterError(
            f"{path}: {len(bad)} score(s) outside the template's range {lo}..{hi} "
            f"(first at row {bad[0] + 1}: {scores[bad[0]]}); pass --score-range LOW HIGH to map them"
        )
    return scores


def _held_out(key: str, fraction: float, seed: int) -> bool:
    h = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(h[:8], "little") / 2**64 < fraction


class TableDatabase(Dataset):
    def __init__(self, paths: list[Path], scores: np.ndarray, transform: Callable):
        self.paths, self.scores, self.transform = paths, scores.astype(np.float32), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            pixels = self.transform(self.paths[i])
        except ImageDecodeError as e:
            raise LaionfilterError(f"{self.paths[i]}: cannot decode image ({e.kind}: {e})") from None
        return pixels, torch.tensor(self.scores[i])


def open_table_database(path, transform, template, *, image_column="image", score_column="score",
                        raw_range: ScoreRange | None = None, val_fraction: float = 0.1, seed: int = 0):
    """(train, val) datasets from a table; every bad row is reported at once."""
    path = Path(path)
    table = read_table(path)
    require_columns(table, [image_column, score_column], path)
    images = [str(v) if v is not None else "" for v in table.column(image_column).to_pylist()]
    raw = table.column(score_column).to_pylist()
    problems = []
    scores = np.full(len(raw), np.nan)
    paths = []
    for row, (img, s) in enumerate(zip(images, raw), start=2):  # row 1 is the header
        try:
            scores[row - 2] = parse_score(s)
        except ValueError as e:
            problems.append(f"row {row}: {e}")
        p = resolve_path(img, path.parent) if img else None
        if p is None or not p.is_file():
            problems.append(f"row {row}: image {img!r} not found" + (f" (looked for {p})" if p else ""))
        paths.append(p)
    if problems:
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise LaionfilterError(f"{path}: {len(problems)} bad row(s):\n  " + "\n  ".join(problems[:20]) + more)
    if len(paths) < 4:
        raise LaionfilterError(f"{path}: {len(paths)} rows; a database needs at least 4 (train and validation)")
    scores = _check_scores(scores, path, template, raw_range)
    if "split" in table.column_names:
        split = np.array([str(s) for s in table.column("split").to_pylist()])
        unknown = sorted(set(split) - {"train", "val"})
        if unknown:
            raise LaionfilterError(f"{path}: column 'split' has {unknown}; expected 'train' or 'val'")
        val = split == "val"
    else:
        val = np.array([_held_out(str(p), val_fraction, seed) for p in paths])
    if val.all() or not val.any():
        raise LaionfilterError(f"{path}: the split leaves no training or no validation rows")
    pick = lambda mask: TableDatabase([p for p, m in zip(paths, mask) if m], scores[mask], transform)
    return pick(~val), pick(val)


class ShardDatabase(IterableDataset):
    """Streams (image, score) from WebDataset shards; a hash of the key decides train or validation."""

    def __init__(self, urls: list[str], transform, template, *, score_key="score", raw_range=None,
                 val_fraction=0.1, seed=0, want_val=False, shuffle=1000):
        self.urls, self.transform, self.template = urls, transform, template
        self.score_key, self.raw_range, self.val_fraction, self.seed = score_key, raw_range, val_fraction, seed
        self.want_val, self.shuffle = want_val, shuffle
        self.epoch = 0

    def __iter__(self):
        import random

        from torch.utils.data import get_worker_info

        from ..reader import Sample, read_shard

        info = get_worker_info()
        # One shard order for all workers of a pass (so that they split it), a new one each pass: in a
        # worker, the loader's base seed (seeded per epoch by the trainer); in this process, a counter.
        if info:
            base = info.seed - info.id
        else:
            base, self.epoch = self.seed * 100_003 + self.epoch, self.epoch + 1
        urls = list(self.urls)
        if not self.want_val:
            random.Random(base).shuffle(urls)
        if info:
            urls = urls[info.id::info.num_workers]
        rng = random.Random(base * 31 + (info.id if info else 0))
        buffer: list[tuple[torch.Tensor, torch.Tensor]] = []
        for url in urls:
            for item in read_shard(url):  # the scorer's reader: a broken shard is reported, never skipped
                if not isinstance(item, Sample):
                    if item.error:
                        raise LaionfilterError(f"{url}: cannot read shard ({item.error})")
                    continue
                if _held_out(item.key, self.val_fraction, self.seed) != self.want_val:
                    continue
                pair = self._example(url, item)
                if self.want_val or not self.shuffle:
                    yield pair
                    continue
                buffer.append(pair)
                if len(buffer) >= self.shuffle:
                    yield buffer.pop(rng.randrange(len(buffer)))
        rng.shuffle(buffer)
        yield from buffer

    def _example(self, url: str, sample) -> tuple[torch.Tensor, torch.Tensor]:
        where = f"{url}:{sample.key}"
        image = sample.image
        if image is None or "json" not in sample.files:
            raise LaionfilterError(f"{where}: sample has no image or no json")
        meta = json.loads(sample.files["json"])
        if self.score_key not in meta:
            raise LaionfilterError(f"{where}: json has no {self.score_key!r}")
        score = _check_scores(np.array([float(meta[self.score_key])]), where, self.template, self.raw_range)[0]
        try:
            pixels = self.transform(image[1])
        except ImageDecodeError as e:
            raise LaionfilterError(f"{where}: cannot decode image ({e.kind}: {e})") from None
        return pixels, torch.tensor(score, dtype=torch.float32)


def open_database(database: str, transform, template, *, image_column="image", score_column="score",
                  score_key="score", raw_range=None, val_fraction=0.1, seed=0, allow_pipe=False):
    """A table file, or shards (a folder of .tar, a brace pattern, or a shard list) with scores in json."""
    p = Path(database)
    if p.suffix.lower() in (".csv", ".tsv", ".tab", ".parquet", ".pq"):
        return open_table_database(p, transform, template, image_column=image_column, score_column=score_column,
                                   raw_range=raw_range, val_fraction=val_fraction, seed=seed)
    from ..shards import expand_shards

    urls = expand_shards(database, allow_pipe)
    common = dict(score_key=score_key, raw_range=raw_range, val_fraction=val_fraction, seed=seed)
    return (ShardDatabase(urls, transform, template, **common),
            ShardDatabase(urls, transform, template, want_val=True, **common))
