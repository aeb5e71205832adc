"""Plain helpers the tests share: real photos, JPEG bytes, WebDataset shards written by webdataset."""

import io
import json
from pathlib import Path

import numpy as np
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
