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

from .images import ImageDecodeError, Preprocessor, gpu_decodable
from .reader import IMAGE_EXTS, Sample, ShardEnd, Source, read_shard, shard_name


@dataclass
class Batch:
    """Samples of one shard: their rows (fixed columns, no scores), and the pixels of those that decoded
    (uint8, resized and cropped: ``Preprocessor.crop``; normalised where the model runs).

    ``index[j]`` is the row of ``pixels[j]``. Once scored (in a worker, on the CPU), ``scores`` holds one
    float32 array per column, ``scores[c][j]`` the score of row ``index[j]``, and ``pixels`` is dropped.
    """

    url: Source
    rows: list[dict[str, Any]]
    index: list[int]
    pixels: torch.Tensor | None
    scores: dict[str, np.ndarray] | None = field(default=None)
    # JPEGs left to decode on the GPU (``--decode gpu``): their encoded bytes, and their rows
    jpegs: list[torch.Tensor] = field(default_factory=list)
    jpeg_rows: list[int] = field(default_factory=list)

    def pin_memory(self) -> "Batch":
        """Called by the DataLoader's pinning thread: the pixels cross to the GPU from pinned memory."""
        if self.pixels is not None:
            self.pixels = self.pixels.pin_memory()
        return self


@dataclass
class ShardDone:
    """The end of a shard; ``error`` says why it ended early (a truncated tar, a failing pipe)."""

    url: Source
    error: str | None = None


def sample_row(sample: Sample, shard: str, pre: Preprocessor,
               gpu_jpeg: bool = False) -> tuple[dict[str, Any], torch.Tensor | None, torch.Tensor | None]:
    """One output row (without scores) and the cropped uint8 pixels, or None with a status and error; with
    ``gpu_jpeg``, a JPEG the GPU can decode is not decoded here: its bytes come third instead."""
    meta = sample.meta()
    row = {"key": sample.key, "shard": shard, "url": meta.get("url"), "caption": meta.get("caption"),
           "width": meta.get("width"), "height": meta.get("height"), "status": "ok", "error": None}
    image = sample.image
    if sample.error:
        row["status"], row["error"] = "unreadable", sample.error
        return row, None, None
    if image is None:
        other = sorted(e for e in sample.files if not e.startswith("__"))
        row["status"], row["error"] = "no_image", f"no {'/'.join(IMAGE_EXTS)} in sample (has: {', '.join(other) or 'nothing'})"
        return row, None, None
    try:
        if gpu_jpeg:
            jpeg = gpu_decodable(image[1], pre.max_pixels)
            if jpeg is not None:
                return row, None, jpeg  # its size is set where it is decoded
        pixels, (row["height"], row["width"]) = pre.load(image[1])
    except ImageDecodeError as e:
        row["status"], row["error"] = e.kind, str(e)[:500]
        return row, None, None
    return row, pixels, None


def decode_on_device(batch: Batch, pre: Preprocessor, device: torch.device) -> Batch:
    """The batch with its JPEGs decoded on ``device`` (nvJPEG on a GPU, in one call) and cropped there,
    beside the pixels the workers decoded, in row order. If the batched call fails (a JPEG the header
    passed but the GPU's decoder refuses), each of its images is decoded on the CPU instead, and one that
    fails there too gets its status and error as it would have in a worker."""
    if not batch.jpegs:
        return batch
    from torchvision.io import ImageReadMode, decode_jpeg

    got = {}
    try:
        for r, img in zip(batch.jpeg_rows, decode_jpeg(batch.jpegs, mode=ImageReadMode.RGB, device=device)):
            batch.rows[r]["height"], batch.rows[r]["width"] = int(img.shape[-2]), int(img.shape[-1])
            got[r] = pre.crop(img)
    except RuntimeError:
        got = {}
        for r, jpeg in zip(batch.jpeg_rows, batch.jpegs):
            try:
                pixels, (batch.rows[r]["height"], batch.rows[r]["width"]) = pre.load(jpeg.numpy().tobytes())
                got[r] = pixels.to(device)
            except ImageDecodeError as e:
                batch.rows[r]["status"], batch.rows[r]["error"] = e.kind, str(e)[:500]
    have = dict(zip(batch.index, batch.pixels.to(device, non_blocking=True))) if batch.pixels is not None else {}
    have.update(got)
    index = sorted(have)
    return Batch(batch.url, batch.rows, index, torch.stack([have[i] for i in index]) if index else None)


def shard_batches(url: Source, pre: Preprocessor, batch_size: int, gpu_jpeg: bool = False) -> Iterator[Batch | ShardDone]:
    """Batches of one shard's decoded samples, then its ShardDone; with ``gpu_jpeg``, JPEGs are left for
    ``decode_on_device``."""
    name = shard_name(url)
    rows: list[dict[str, Any]] = []
    pixels: list[torch.Tensor] = []
    index: list[int] = []
    jpegs: list[torch.Tensor] = []
    jpeg_rows: list[int] = []

    def batch() -> Batch:
        return Batch(url, rows, index, torch.stack(pixels) if pixels else None, jpegs=jpegs, jpeg_rows=jpeg_rows)

    for item in read_shard(url):
        if isinstance(item, ShardEnd):
            if rows:
                yield batch()
            yield ShardDone(url, item.error)
            return
        row, px, jpeg = sample_row(item, name, pre, gpu_jpeg)
        if px is not None:
            index.append(len(rows))
            pixels.append(px)
        if jpeg is not None:
            jpeg_rows.append(len(rows))
            jpegs.append(jpeg)
        rows.append(row)
        if len(rows) == batch_size:
            yield batch()
            rows, pixels, index, jpegs, jpeg_rows = [], [], [], [], []
