"""Plain helpers the tests share: real photos, JPEG bytes, WebDataset shards written by webdataset."""

import contextlib
import io
import json
import subprocess
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from laionfilter.train.starter import load_photo, random_crop


def jpeg(img: Image.Image, quality=90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def crops(n, seed):
    rng = np.random.default_rng(seed)
    photos = [load_photo(p) for p in ("coffee", "china", "flower", "coins")]
    return [random_crop(photos[i % 4], int(rng.integers(70, 140)), rng) for i in range(n)]


def write_shard(path: Path, samples: list[dict]) -> Path:
    with wds.TarWriter(str(path)) as sink:
        for s in samples:
            sink.write(s)
    return path


def good_samples(prefix: str, n: int, seed: int) -> list[dict]:
    out = []
    for i, img in enumerate(crops(n, seed)):
        key = f"{prefix}{i:04d}"
        out.append({"__key__": key, "jpg": jpeg(img),
                    "json": json.dumps({"url": f"https://example.com/{key}.jpg", "caption": f"photo {key}",
                                        "width": img.width, "height": img.height, "key": key}).encode(),
                    "txt": f"photo {key}".encode()})
    return out


@contextlib.contextmanager
def tmpfs(folder: Path, options: str = "size=1m") -> Iterator[Path]:
    """A small tmpfs mounted on ``folder`` (made here) for the block: a real full disk (``size=``) or a
    read-only one (``ro``). Mounting needs root: elsewhere the test is skipped, saying why."""
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True).returncode:
        pytest.skip(f"cannot mount a tmpfs ({options}) here: it needs root")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=False)
