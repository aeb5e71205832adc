"""Materialising a subset: copy its samples out of local shards, or download them with img2dataset."""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import pyarrow as pa

from .errors import LaionfilterError
from .log import note
from .reader import Sample, read_shard, shard_name
from .shards import expand_shards
from .tables import read_table, require_columns


def reshard(subset: str | os.PathLike, shards: str, out: str | os.PathLike, maxcount: int = 10000,
            allow_pipe: bool = False) -> dict[str, Any]:
    """Copy the subset's samples (every file, bytes untouched) into new shards, reading each source shard once."""
    import webdataset as wds

    table = read_table(subset)
    require_columns(table, ["key", "shard"], subset)
    wanted: dict[str, set[str]] = defaultdict(set)
    for key, shard in zip(table.column("key").to_pylist(), table.column("shard").to_pylist()):
        wanted[shard].add(key)
    urls = {shard_name(u): u for u in expand_shards(shards, allow_pipe)}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    missing: list[str] = []
    copied = 0
    with wds.ShardWriter(str(out / "%05d.tar"), maxcount=maxcount, verbose=0) as sink:
        for shard in sorted(wanted):
            keys = wanted[shard]
            if shard not in urls:
                missing.extend(f"{shard}/{k}" for k in sorted(keys))
                continue
            for item in read_shard(urls[shard]):
                if isinstance(item, Sample) and item.key in keys:
                    sink.write({"__key__": item.key, **item.files})
                    keys.discard(item.key)
                    copied += 1
            missing.extend(f"{shard}/{k}" for k in sorted(keys))
    for m in missing[:20]:
        note(f"reshard: sample {m} is not in the shards given")
    return {"copied": copied, "missing": len(missing), "missing_samples": missing, "out": str(out)}


def fetch(subset: str | os.PathLike, out: str | os.PathLike, **img2dataset_options: Any) -> dict[str, Any]:
    """Download the subset's urls (with captions) as WebDataset shards with img2dataset."""
    try:
        import img2dataset
    except ImportError:
        raise LaionfilterError("fetch needs img2dataset: pip install 'laionfilter[fetch]'") from None
    import pyarrow.parquet as pq

    table = read_table(subset)
    require_columns(table, ["url"], subset)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    urls = out / "_urls.parquet"
    cols = {"url": table.column("url"),
            "caption": table.column("caption") if "caption" in table.column_names else pa.nulls(table.num_rows, pa.string())}
    pq.write_table(pa.table(cols), urls)
    options = {"output_format": "webdataset", "processes_count": 1, "thread_count": 16, "enable_wandb": False,
               "image_size": 256, "resize_mode": "border", **img2dataset_options}
    img2dataset.download(url_list=str(urls), input_format="parquet", url_col="url", caption_col="caption",
                         output_folder=str(out), **options)
    stats = list(out.glob("*_stats.json"))
    import json

    ok = failed = 0
    for s in stats:
        d = json.loads(s.read_text())
        ok += d.get("successes", 0)
        failed += d.get("failed_to_download", 0) + d.get("failed_to_resize", 0)
    return {"requested": table.num_rows, "downloaded": ok, "failed": failed, "out": str(out)}
