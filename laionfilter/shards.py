"""Finding WebDataset shards: a folder of .tar, a glob, a brace pattern, a list file, or URLs.

A ``pipe:`` URL runs a shell command, so every one needs ``allow_pipe`` (``--allow-pipe``), however it
was formed: typed, read from a list file, or made by brace expansion. A file found in a folder or by a
glob is always a file, whatever its name: local shards are handed on as absolute paths, which no URL
parser reads as a scheme (a file named ``pipe:cmd.tar`` is opened, never run). webdataset opens
``http(s)://``, ``gs://`` and similar URLs with a shell command that quotes the URL in single quotes,
so a URL holding a quote or a space is refused wherever it comes from.
"""

from __future__ import annotations

import glob
import os
import re
from pathlib import Path

import braceexpand

from .errors import LaionfilterError

_SAFE_URL = re.compile(r"[A-Za-z0-9._~:/?#\[\]@!$&()*+,;=%{}-]+")  # RFC 3986 characters, no quote or space
LIST_SUFFIXES = (".txt", ".lst", ".list")


def is_remote(url: str) -> bool:
    return url.startswith("pipe:") or "://" in url


def _url_or_path(u: str, where: str, allow_pipe: bool, base: Path) -> str:
    """One entry written by a person (typed or in a list file): a checked URL, or a local shard's absolute path."""
    if u.startswith("pipe:"):
        if not allow_pipe:
            raise LaionfilterError(f"{where}: {u[:80]!r} would run a shell command; pipe: URLs run only with "
                                   "--allow-pipe")
        return u
    if "://" in u:
        if not _SAFE_URL.fullmatch(u):
            raise LaionfilterError(f"{where}: URL {u!r} holds a quote, space or other character that would reach "
                                   "a shell command; percent-encode it")
        return u
    return os.path.abspath(base / u)


def _read_list(p: Path, allow_pipe: bool) -> list[str]:
    urls = []
    for number, line in enumerate(p.read_text().splitlines(), 1):
        line = line.strip()
        if line and not line.startswith("#"):
            urls.extend(_url_or_path(u, f"{p}, line {number}", allow_pipe, p.parent)
                        for u in braceexpand.braceexpand(line))
    return urls


def expand_shards(spec: str, allow_pipe: bool = False) -> list[str]:
    """Shard URLs and absolute paths, de-duplicated, for any of the accepted spellings."""
    p = Path(spec)
    if not is_remote(spec) and p.is_dir():
        urls = sorted(os.path.abspath(x) for x in p.glob("*.tar"))
        if not urls:
            raise LaionfilterError(f"{spec}: folder holds no .tar shards")
    elif not is_remote(spec) and p.is_file() and p.suffix.lower() in LIST_SUFFIXES:
        urls = _read_list(p, allow_pipe)
    else:
        urls = []
        for part in braceexpand.braceexpand(spec):
            if not is_remote(part) and any(c in part for c in "*?["):
                urls.extend(os.path.abspath(hit) for hit in sorted(glob.glob(part)))  # files, whatever their names
            else:
                urls.append(_url_or_path(part, "shards", allow_pipe, Path.cwd()))
        if not urls:
            raise LaionfilterError(f"{spec}: no shards match")
    missing = [u for u in urls if not is_remote(u) and not Path(u).is_file()]
    if missing:
        raise LaionfilterError(f"{missing[0]}: no such shard" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return list(dict.fromkeys(urls))
