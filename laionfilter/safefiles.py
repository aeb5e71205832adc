"""Reading and writing tensors and JSON safely.

Banks, task checkpoints and profiles may come from strangers, so tensors are only ever read from
safetensors files and metadata from JSON: nothing is unpickled. Every error names the file.
Writes go to a temporary name in the same folder and are renamed into place when whole.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import LaionfilterError

META_KEY = "laionfilter"

# What the first bytes of a file say it is, for files that are not safetensors.
_PICKLE_SIGNS = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


def _explain_not_safetensors(path: Path, head: bytes) -> str:
    if head.startswith(_PICKLE_SIGNS):
        return (
            f"{path}: this is a pickled PyTorch file (torch.save); laionfilter never unpickles files, "
            "since a pickle can run arbitrary code. Convert it to safetensors on a machine where you trust "
            "its source (safetensors.torch.save_file)."
        )
    return f"{path}: not a safetensors file"


_READ_ERRORS = (SafetensorError, OSError, ValueError, RuntimeError)


def _read(path: str | os.PathLike, what: str, read) -> tuple[Any, dict[str, Any]]:
    """``read(path)`` on a file checked to look like safetensors, plus its laionfilter metadata."""
    path = Path(path)
    if not path.is_file():
        raise LaionfilterError(f"{path}: no such {what}" + (" (it is a folder)" if path.is_dir() else ""))
    with open(path, "rb") as f:
        head = f.read(16)
    if len(head) < 8:
        raise LaionfilterError(f"{path}: {what} is empty or truncated")
    header_len = int.from_bytes(head[:8], "little")
    if head[8:9] != b"{" or header_len > path.stat().st_size:
        raise LaionfilterError(_explain_not_safetensors(path, head))
    try:
        content = read(path)
        with safe_open_meta(path) as meta:
            raw = meta.get(META_KEY)
    except _READ_ERRORS as e:
        raise LaionfilterError(f"{path}: corrupt or truncated safetensors {what} ({e})") from None
    try:
        metadata = json.loads(raw) if raw else {}
    except json.JSONDecodeError as e:
        raise LaionfilterError(f"{path}: its laionfilter metadata is not valid JSON ({e})") from None
    return content, metadata


def read_safetensors(path: str | os.PathLike, what: str = "file") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Return (tensors, laionfilter metadata) from a safetensors file, with errors naming the file."""
    return _read(path, what, lambda p: load_file(str(p)))


def read_safetensors_shapes(path: str | os.PathLike, what: str = "file") -> tuple[dict[str, tuple[int, ...]], dict[str, Any]]:
    """Return (name → shape, laionfilter metadata) from a safetensors file's header, reading no tensor."""
    from safetensors import safe_open

    def shapes(p: Path) -> dict[str, tuple[int, ...]]:
        with safe_open(str(p), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}

    return _read(path, what, shapes)


class StoredTensors(Mapping):
    """Named tensors of a safetensors file (``prefix`` + name), each read when asked for.

    Nothing is held: a tensor is mapped from the file when indexed and released with it, so a caller
    going through a large file one tensor at a time holds one tensor, not the file.
    """

    def __init__(self, path: Path, names: list[str], prefix: str = "", what: str = "file"):
        self.path, self.names, self.prefix, self.what = Path(path), list(names), prefix, what
        self._known = set(self.names)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._known:
            raise KeyError(name)
        from safetensors import safe_open

        try:
            with safe_open(str(self.path), framework="pt") as f:
                return f.get_tensor(self.prefix + name)
        except _READ_ERRORS as e:
            raise LaionfilterError(f"{self.path}: cannot read {self.prefix + name} from the {self.what} ({e})") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


@contextlib.contextmanager
def safe_open_meta(path: Path) -> Iterator[dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        yield f.metadata() or {}


def read_metadata(path: str | os.PathLike, what: str = "file") -> dict[str, Any]:
    """The laionfilter metadata of a safetensors file, without loading its tensors."""
    return _read(path, what, lambda p: None)[1]


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a hidden temporary name beside ``path``; renamed to ``path`` when the block ends whole.

    If the block fails (a full disk, a killed writer raising), the temporary file is removed: a reader
    sees the old file or the new one, never half of one, and nothing half-written is left behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.filename is None:  # pyarrow's and safetensors' errors do not say which file: name the one meant
            raise OSError(e.errno, e.strerror or str(e), str(path)) from e
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> Path:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_write(path) as tmp:
        save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(metadata, sort_keys=True)})
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    with atomic_write(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def _parse_text(path: str | os.PathLike, what: str, kind: str, parse, errors) -> Any:
    path = Path(path)
    if not path.is_file():
        raise LaionfilterError(f"{path}: no such {what}")
    try:
        return parse(path.read_text())
    except (*errors, UnicodeDecodeError) as e:
        raise LaionfilterError(f"{path}: not valid {kind} ({e})") from None


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    return _parse_text(path, what, "JSON", json.loads, (json.JSONDecodeError,))


def read_toml(path: str | os.PathLike, what: str = "job file") -> dict[str, Any]:
    import tomllib

    return _parse_text(path, what, "TOML", tomllib.loads, (tomllib.TOMLDecodeError,))


def file_sha256(path: str | os.PathLike, h: "hashlib._Hash | None" = None) -> "hashlib._Hash":
    h = h or hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h


def state_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes: equal weights give equal fingerprints."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
