"""Finding WebDataset shards: a folder of .tar, a glob, a brace pattern, a list file, or pipe: URLs.

A ``pipe:`` URL runs a shell command. Typed on the command line it is the user's own choice; from a
list file, which may come from anyone, it runs only with ``allow_pipe`` (``--allow-pipe``). webdataset
opens ``http(s)://``, ``gs://`` and similar URLs with a shell command that quotes the URL in single
quotes, so a URL holding a quote or a space is refused wherever it comes from.
"""

from __future__ import annotations

import glob
import re
from pathlib import Path

import braceexpand

from .errors import LaionfilterError

URL_PREFIXES = ("pipe:", "http://", "https://", "s3://", "gs://")
_SAFE_URL = re.compile(r"[A-Za-z0-9._~:/?#\[\]@!$&()*+,;=%{}-]+")  # RFC 3986 characters, no quote or space


def is_remote(url: str) -> bool:
    return url.startswith("pipe:") or "://" in url


def _check_url(url: str, where: str) -> None:
    if not url.startswith("pipe:") and "://" in url and not _SAFE_URL.fullmatch(url):
        raise LaionfilterError(f"{where}: URL {url!r} holds a quote, space or other character that would reach a "
                               "shell command; percent-encode it")


def _read_list(p: Path, allow_pipe: bool) -> list[str]:
    urls = []
    for number, line in enumerate(p.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{p}, line {number}"
        if line.startswith("pipe:") and not allow_pipe:
            raise LaionfilterError(f"{where}: {line[:80]!r} would run a shell command; a list file runs commands "
                                   "only with --allow-pipe")
        for u in braceexpand.braceexpand(line):
            _check_url(u, where)
            urls.append(u if ":" in u.split("/")[0] or Path(u).is_absolute() else str(p.parent / u))
    return urls


def expand_shards(spec: str, allow_pipe: bool = False) -> list[str]:
    """Shard URLs, sorted and de-duplicated, for any of the accepted spellings."""
    if spec.startswith(URL_PREFIXES):
        urls = list(braceexpand.braceexpand(spec))
        for u in urls:
            _check_url(u, "shards")
    else:
        p = Path(spec)
        if p.is_dir():
            urls = sorted(str(x) for x in p.glob("*.tar"))
            if not urls:
                raise LaionfilterError(f"{spec}: folder holds no .tar shards")
        elif p.is_file() and p.suffix.lower() in (".txt", ".lst", ".list"):
            urls = _read_list(p, allow_pipe)
        else:
            urls = []
            for part in braceexpand.braceexpand(spec):
                hits = sorted(glob.glob(part)) if any(c in part for c in "*?[") else [part]
                urls.extend(hits)
            if not urls:
                raise LaionfilterError(f"{spec}: no shards match")
        missing = [u for u in urls if not is_remote(u) and not Path(u).is_file()]
        if missing:
            raise LaionfilterError(f"{missing[0]}: no such shard" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    seen = dict.fromkeys(urls)
    return list(seen)
