"""Finding what to score: WebDataset shards (a folder of .tar, a glob, a brace pattern, a list file, or
URLs), or one's own image files (a folder, searched recursively, a glob, or a list file of them), which
are read where they are, in chunks of ``CHUNK`` scored as shards are, each image keyed by its path
relative to the folder.

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
from .reader import IMAGE_EXTS, ImageChunk, Source

_SAFE_URL = re.compile(r"[A-Za-z0-9._~:/?#\[\]@!$&()*+,;=%{}-]+")  # RFC 3986 characters, no quote or space
LIST_SUFFIXES = (".txt", ".lst", ".list")
IMAGE_SUFFIXES = tuple(f".{e}" for e in IMAGE_EXTS)
CHUNK = 1000  # images per part file of a folder of images: a rerun redoes at most this many


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
            raise LaionfilterError(f"{spec}: holds no .tar shards and no images ({', '.join(IMAGE_SUFFIXES)})")
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


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()


def find_images(spec: str) -> tuple[Path, list[str]] | None:
    """The image files ``spec`` names, as their root folder and their sorted paths relative to it: a folder
    without .tar shards (searched recursively), a glob that matches images, or a list file of image
    paths. None where ``spec`` names shards (or URLs)."""
    if is_remote(spec):
        return None
    p = Path(spec)
    if p.is_dir():
        if any(p.glob("*.tar")):
            return None
        root = p.resolve()
        return root, sorted(f.relative_to(root).as_posix() for f in root.rglob("*") if _is_image(f))
    if glob.has_magic(spec) and "{" not in spec:
        hits = [Path(h).resolve() for h in glob.glob(spec, recursive=True)]
        if not any(_is_image(h) for h in hits):
            return None
        literal = [part for part in Path(spec).parts[:-1]]
        stop = next((i for i, part in enumerate(literal) if glob.has_magic(part)), len(literal))
        root = Path(*literal[:stop]).resolve() if stop else Path.cwd()
        return root, sorted(h.relative_to(root).as_posix() for h in hits if _is_image(h))
    if p.is_file() and p.suffix.lower() in LIST_SUFFIXES:
        lines = [x.strip() for x in p.read_text().splitlines() if x.strip() and not x.strip().startswith("#")]
        if not lines or not all(Path(x).suffix.lower() in IMAGE_SUFFIXES for x in lines):
            return None
        files = [(p.parent / x).resolve() for x in lines]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise LaionfilterError(f"{missing[0]}: no such image (listed in {p})"
                                   + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        root = Path(os.path.commonpath([f.parent for f in files]))
        return root, sorted(dict.fromkeys(f.relative_to(root).as_posix() for f in files))
    return None


def expand_sources(spec: str, allow_pipe: bool = False) -> list[Source]:
    """What ``spec`` names, to score: image files in chunks, or shards (see ``expand_shards``)."""
    found = find_images(spec)
    if found is None:
        return expand_shards(spec, allow_pipe)
    root, files = found
    if not files:
        raise LaionfilterError(f"{spec}: holds no .tar shards and no images ({', '.join(IMAGE_SUFFIXES)})")
    return [ImageChunk(f"images-{i // CHUNK:05d}", str(root), tuple(files[i:i + CHUNK]))
            for i in range(0, len(files), CHUNK)]
