"""Opening images safely: one decoder for every stage, with decompression bombs refused."""

from __future__ import annotations

import io
import os
import warnings

from PIL import Image

# Far above any real photo (about 16k × 16k), far below what would exhaust memory.
MAX_PIXELS = 256_000_000


class ImageDecodeError(ValueError):
    """An image could not be decoded; ``kind`` is a short status (corrupt, bomb, unsupported)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def open_rgb(source: bytes | str | os.PathLike, draft_size: int | None = None) -> Image.Image:
    """Decode to an RGB PIL image; JPEGs are decoded at reduced size when ``draft_size`` allows."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)
            if img.width * img.height > MAX_PIXELS:
                raise ImageDecodeError("bomb", f"{img.width}x{img.height} pixels is over the {MAX_PIXELS} limit")
            if draft_size and img.format == "JPEG":
                img.draft("RGB", (draft_size, draft_size))
            img.load()
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageDecodeError("bomb", str(e)) from None
    except Image.UnidentifiedImageError as e:
        raise ImageDecodeError("unsupported", str(e)) from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageDecodeError("corrupt", str(e) or type(e).__name__) from None
    return img.convert("RGB")
