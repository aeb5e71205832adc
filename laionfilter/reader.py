"""Reading WebDataset shards sample by sample, with every failure reported rather than dropped.

webdataset opens the shard (local paths and ``pipe:`` URLs alike) and walks the tar; grouping files
into samples is done here so that a tar that breaks half way still yields the samples it completed
and then says so: nothing read is ever silently dropped (webdataset's stock handlers sleep and count
nothing).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")


@dataclass
class Sample:
    key: str
    files: dict[str, bytes] = field(default_factory=dict)
    error: str | None = None  # an image file that could not be read (a folder of images)

    @property
    def image(self) -> tuple[str, bytes] | None:
        return next(((e, self.files[e]) for e in IMAGE_EXTS if e in self.files), None)

    def meta(self) -> dict[str, Any]:
        """url, caption, width, height from img2dataset's json (and txt), where present."""
        out: dict[str, Any] = {}
        if "json" in self.files:
            try:
                j = json.loads(self.files["json"])
                if isinstance(j, dict):
                    out = {k: j.get(k) for k in ("url", "caption", "width", "height") if j.get(k) is not None}
            except (json.JSONDecodeError, UnicodeDecodeError):
                out["_json_error"] = "json is not valid"
        if "caption" not in out and "txt" in self.files:
            out["caption"] = self.files["txt"].decode("utf-8", errors="replace")
        return out


@dataclass
class ShardEnd:
    """Marks the end of a shard: ``error`` is set when the tar broke before its end."""

    url: str
    error: str | None = None


def shard_name(url: str | ImageChunk) -> str:
    """A shard's name for its output files: the tar's file name without extension."""
    if isinstance(url, ImageChunk):
        return url.name
    base = url.rstrip("/ -").split("/")[-1].split()[-1] if url.startswith("pipe:") else os.path.basename(url)
    for ext in (".tar.gz", ".tgz", ".tar"):
        if base.endswith(ext):
            return base[: -len(ext)]
    return Path(base).stem or base


def describe_error(url: str, e: BaseException) -> str:
    """One line for a shard that could not be read; a failing ``pipe:`` names its command and status."""
    status = re.search(r"exit (-?\d+)", str(e)) if url.startswith("pipe:") else None
    if status:
        return f"command {url[5:]!r} exited with status {status.group(1)}"
    return f"{type(e).__name__}: {e}"


def read_shard(url: str | ImageChunk) -> Iterator[Sample | ShardEnd]:
    """Samples of one shard in order, then a ShardEnd (with the error if the tar broke)."""
    if isinstance(url, ImageChunk):
        yield from _read_images(url)
        return
    from webdataset.gopen import gopen
    from webdataset.tariterators import base_plus_ext, tar_file_iterator

    def reraise(exn: Exception) -> bool:
        raise exn  # a short read inside the tar must end the shard as failed, not quietly

    current: Sample | None = None
    error = None
    stream = None
    try:
        stream = gopen(url)
        for f in tar_file_iterator(stream, handler=reraise):
            prefix, suffix = base_plus_ext(f["fname"])
            if prefix is None:
                continue
            suffix = suffix.lower()
            if current is None or prefix != current.key:
                if current is not None:
                    yield current
                current = Sample(prefix)
            current.files[suffix] = f["data"]
    except Exception as e:  # a truncated or unreadable tar, a failing pipe:
        error = describe_error(url, e)
    finally:
        if stream is not None:
            try:
                stream.close()
            except Exception as e:  # pipe: reports a failing command on close: the cause of any read error
                error = describe_error(url, e)
    if current is not None:
        yield current
    yield ShardEnd(url, error)


@dataclass(frozen=True)
class ImageChunk:
    """Image files scored as one shard (``shards.CHUNK`` at most): a folder of one's own images needs no tar.
    Each is a sample whose key is its path relative to ``root``; the files are read where they are."""

    name: str  # the part file's name
    root: str
    files: tuple[str, ...]  # paths relative to root, "/"-separated

    def __str__(self) -> str:
        return f"{self.root} ({self.name}" + (f": {self.files[0]} .. {self.files[-1]})" if self.files else ")")


Source = str | ImageChunk  # a shard's URL or path, or a chunk of image files


def _read_images(chunk: ImageChunk) -> Iterator[Sample | ShardEnd]:
    for rel in chunk.files:
        ext = rel.rsplit(".", 1)[-1].lower()
        try:
            yield Sample(rel, {ext: (Path(chunk.root) / rel).read_bytes()})
        except OSError as e:  # a file that vanished or cannot be read: its row says so
            yield Sample(rel, error=f"cannot read the file ({e.strerror or e})")
    yield ShardEnd(str(chunk))
