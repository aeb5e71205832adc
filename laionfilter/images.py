"""Decoding and preprocessing images: one path for learning, evaluation and scoring.

Images are decoded by torchvision (libjpeg-turbo, libpng, libwebp) into uint8 tensors and preprocessed
with tensor ops equal to open_clip's eval transform: resize the shorter side (bicubic, antialiased),
centre crop, scale to [0, 1], normalise. The header is read first with PIL (lazily: no pixels) so that
decompression bombs are refused before any memory is spent on them.
"""

from __future__ import annotations

import io
import os
import warnings
from typing import Any

import torch
from PIL import Image

# torchvision 0.29 marks its decoders deprecated in favour of torchcodec; they are what is pinned and
# measured here, so the per-image warning is silenced.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)

# Far above any real photo (about 16k × 16k), far below what would exhaust memory.
MAX_PIXELS = 256_000_000


class ImageDecodeError(ValueError):
    """An image could not be decoded; ``kind`` is a short status (corrupt, bomb, unsupported)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def _header(data: bytes) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageDecodeError("bomb", str(e)) from None
    except Image.UnidentifiedImageError:
        raise ImageDecodeError("unsupported", "not an image format that can be read") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageDecodeError("corrupt", str(e) or type(e).__name__) from None
    if img.width * img.height > MAX_PIXELS:
        raise ImageDecodeError("bomb", f"{img.width}x{img.height} pixels is over the {MAX_PIXELS} limit")
    return img


def decode(source: bytes | str | os.PathLike | Image.Image) -> torch.Tensor:
    """An RGB uint8 tensor [3, H, W] from encoded bytes, a file path or a PIL image."""
    if isinstance(source, Image.Image):
        from torchvision.transforms.v2.functional import pil_to_tensor

        return pil_to_tensor(source.convert("RGB"))
    if not isinstance(source, (bytes, bytearray)):
        with open(source, "rb") as f:
            source = f.read()
    header = _header(bytes(source))
    from torchvision.io import ImageReadMode, decode_image

    if header.format in ("JPEG", "PNG", "WEBP", "GIF"):
        try:
            return decode_image(torch.frombuffer(bytearray(source), dtype=torch.uint8), mode=ImageReadMode.RGB)
        except RuntimeError:
            pass  # torchvision refuses some valid files (CMYK JPEG, odd PNGs); PIL decides below
    try:
        header.load()
        from torchvision.transforms.v2.functional import pil_to_tensor

        return pil_to_tensor(header.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageDecodeError("corrupt", str(e) or type(e).__name__) from None


class Preprocessor:
    """open_clip's eval transform (resize shortest side, centre crop, normalise) on uint8 tensors."""

    def __init__(self, preprocess: dict[str, Any]):
        size = preprocess["size"]
        self.size = [int(size), int(size)] if isinstance(size, (int, float)) else [int(s) for s in size]
        if preprocess.get("resize_mode", "shortest") != "shortest":
            raise ValueError(f"resize_mode {preprocess['resize_mode']!r} is not supported")
        from torchvision.transforms import InterpolationMode

        self.interpolation = InterpolationMode(preprocess.get("interpolation", "bicubic"))
        self.mean = torch.tensor(preprocess["mean"], dtype=torch.float32)[:, None, None]
        self.std = torch.tensor(preprocess["std"], dtype=torch.float32)[:, None, None]

    def __call__(self, image: torch.Tensor | bytes | str | os.PathLike | Image.Image) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as F

        img = image if isinstance(image, torch.Tensor) else decode(image)
        # An int size resizes the shorter side with torchvision's rounding, as open_clip's transform does.
        target = self.size[0] if self.size[0] == self.size[1] else self.size
        if min(img.shape[-2:]) != target or not isinstance(target, int):
            img = F.resize(img, target, interpolation=self.interpolation, antialias=True)
        img = F.center_crop(img, self.size)
        return (img.float() / 255 - self.mean) / self.std
