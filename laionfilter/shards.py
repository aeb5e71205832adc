"""Finding WebDataset shards: a folder of .tar, a glob, a brace pattern, a list file, or pipe: URLs."""

from __future__ import annotations

import glob
from pathlib import Path

import braceexpand

from .errors import LaionfilterError


def expand_shards(spec: str) -> list[str]:
    """Shard URLs, sorted and de-duplicated, for any of the accepted spellings."""
    if spec.startswith(("pipe:", "http://", "https://", "s3://", "gs://")):
        urls = list(braceexpand.braceexpand(spec))
    else:
        p = Path(spec)
        if p.is_dir():
            urls = sorted(str(x) for x in p.glob("*.tar"))
            if not urls:
                raise LaionfilterError(f"{spec}: folder holds no .tar shards")
        elif p.is_file() and p.suffix.lower() in (".txt", ".lst", ".list"):
            base = p.parent
            urls = []
            for line in p.read_text().splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    urls.extend(u if ":" in u.split("/")[0] or Path(u).is_absolute() else str(base / u)
                                for u in braceexpand.braceexpand(line))
        else:
            urls = []
            for part in braceexpand.braceexpand(spec):
                hits = sorted(glob.glob(part)) if any(c in part for c in "*?[") else [part]
                urls.extend(hits)
            if not urls:
                raise LaionfilterError(f"{spec}: no shards match")
        missing = [u for u in urls if not u.startswith("pipe:") and "://" not in u and not Path(u).is_file()]
        if missing:
            raise LaionfilterError(f"{missing[0]}: no such shard" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    seen = dict.fromkeys(urls)
    return list(seen)
