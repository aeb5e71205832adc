"""Stage 2 of scoring: a shard's samples → decoded, preprocessed pixels plus the row each becomes.

``shard_batches`` turns one shard (read by ``reader``) into ``Batch``es of at most ``batch_size``
samples, never spanning shards, then one ``ShardDone``. Every sample gets a row: one that cannot be
decoded keeps its row with a status and error, and no pixels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch

from .images import ImageDecodeError, Preprocessor, decode
from .reader import IMAGE_EXTS, Sample, ShardEnd, read_shard, shard_name


@dataclass
class Batch:
    """Samples of one shard: their rows (fixed columns, no scores), and the pixels of those that decoded.

    ``index[j]`` is the row of ``pixels[j]``. Once scored (in a worker, on the CPU), ``scores`` holds one
    float32 array per column, ``scores[c][j]`` the score of row ``index[j]``, and ``pixels`` is dropped.
    """

    url: str
    rows: list[dict[str, Any]]
    index: list[int]
    pixels: torch.Tensor | None
    scores: dict[str, np.ndarray] | None = field(default=None)


@dataclass
class ShardDone:
    """The end of a shard; ``error`` says why it ended early (a truncated tar, a failing pipe)."""

    url: str
    error: str | None = None


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


def shard_batches(url: str, pre: Preprocessor, batch_size: int) -> Iterator[Batch | ShardDone]:
    """Batches of one shard's decoded samples, then its ShardDone."""
    name = shard_name(url)
    rows: list[dict[str, Any]] = []
    pixels: list[torch.Tensor] = []
    index: list[int] = []

    def batch() -> Batch:
        return Batch(url, rows, index, torch.stack(pixels) if pixels else None)

    for item in read_shard(url):
        if isinstance(item, ShardEnd):
            if rows:
                yield batch()
            yield ShardDone(url, item.error)
            return
        row, px = sample_row(item, name, pre)
        if px is not None:
            index.append(len(rows))
            pixels.append(px)
        rows.append(row)
        if len(rows) == batch_size:
            yield batch()
            rows, pixels, index = [], [], []
