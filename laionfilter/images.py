"""Decoding and preprocessing images: one path for learning, evaluation and scoring.

Images are decoded by torchvision (libjpeg-turbo, libpng, libwebp) into uint8 tensors and preprocessed
with tensor ops equal to open_clip's eval transform: resize the shorter side (bicubic, antialiased),
centre crop, scale to [0, 1], normalise. The header is read first with PIL (lazily: no pixels) so that
decompression bombs are refused before any memory is spent on them.

Every decoded image is 8-bit RGB with the pixels of its 8-bit equivalent: 16-bit images are scaled
(not clipped), alpha is dropped as open_clip's ``convert("RGB")`` drops it, and modes without a defined
8-bit range (32-bit integer or float pixels) are refused as ``unsupported`` rather than scored wrongly.
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

# The one limit on an image's size: far above any real photo (about 16k × 16k), far below what would
# exhaust memory. PIL's own bomb check (89.5 Mpx) is set aside so that this is the only one.
MAX_PIXELS = int(os.environ.get("LAIONFILTER_MAX_PIXELS", 256_000_000))
_UNSCALED_MODES = {"I": "32-bit integer", "F": "32-bit float"}


class ImageDecodeError(ValueError):
    """An image could not be decoded; ``kind`` is a short status (corrupt, bomb, unsupported)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def _header(data: bytes, max_pixels: int) -> Image.Image:
    limit = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = None  # our limit below is the one that counts
        img = Image.open(io.BytesIO(data))
    except Image.UnidentifiedImageError:
        raise ImageDecodeError("unsupported", "not an image format that can be read") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageDecodeError("corrupt", str(e) or type(e).__name__) from None
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    if img.width * img.height > max_pixels:
        raise ImageDecodeError("bomb", f"{img.width}x{img.height} = {img.width * img.height} pixels is over the "
                                       f"{max_pixels}-pixel limit (--max-pixels, or LAIONFILTER_MAX_PIXELS)")
    return img


def _to_rgb8(img: Image.Image) -> torch.Tensor:
    """PIL's pixels as RGB uint8, 16-bit scaled rather than clipped (PIL's convert clips I;16 to 255)."""
    import numpy as np
    from torchvision.transforms.v2.functional import pil_to_tensor

    if img.mode in _UNSCALED_MODES:
        raise ImageDecodeError("unsupported", f"{_UNSCALED_MODES[img.mode]} pixels (mode {img.mode}) have no defined "
                                              "8-bit range; save the image with 8 or 16 bits per channel")
    if img.mode.startswith("I;16"):
        grey = np.asarray(img).astype(np.uint32)
        img = Image.fromarray(((grey * 255 + 32767) // 65535).astype(np.uint8), "L")
    return pil_to_tensor(img.convert("RGB"))


def decode(source: bytes | str | os.PathLike | Image.Image, max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    """An RGB uint8 tensor [3, H, W] from encoded bytes, a file path or a PIL image (first frame)."""
    if isinstance(source, Image.Image):
        return _to_rgb8(source)
    if not isinstance(source, (bytes, bytearray)):
        with open(source, "rb") as f:
            source = f.read()
    header = _header(bytes(source), max_pixels)
    from torchvision.io import ImageReadMode, decode_image
    from torchvision.transforms.v2.functional import to_dtype

    if header.format in ("JPEG", "PNG", "WEBP", "GIF"):
        try:
            img = decode_image(torch.frombuffer(bytearray(source), dtype=torch.uint8), mode=ImageReadMode.RGB)
        except RuntimeError:
            pass  # torchvision refuses some valid files (odd PNGs, some CMYK JPEGs); PIL decides below
        else:
            img = img[0] if img.ndim == 4 else img  # an animated GIF: its first frame, as PIL gives
            return img if img.dtype == torch.uint8 else to_dtype(img, torch.uint8, scale=True)  # 16-bit PNG
    try:
        header.load()
        return _to_rgb8(header)
    except ImageDecodeError:
        raise
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageDecodeError("corrupt", str(e) or type(e).__name__) from None


class Preprocessor:
    """open_clip's eval transform (resize shortest side, centre crop, normalise) on uint8 tensors.

    ``resize_size``, when given, is the shorter side before the crop (the paper authors' transform:
    Resize(256) then CenterCrop(224)); otherwise the shorter side is resized to the crop size.
    """

    def __init__(self, preprocess: dict[str, Any], max_pixels: int = MAX_PIXELS):
        self.max_pixels = max_pixels
        size = preprocess["size"]
        self.size = [int(size), int(size)] if isinstance(size, (int, float)) else [int(s) for s in size]
        self.resize = int(preprocess["resize_size"]) if preprocess.get("resize_size") else None
        if preprocess.get("resize_mode", "shortest") != "shortest":
            raise ValueError(f"resize_mode {preprocess['resize_mode']!r} is not supported")
        from torchvision.transforms import InterpolationMode

        self.interpolation = InterpolationMode(preprocess.get("interpolation", "bicubic"))
        self.mean = torch.tensor(preprocess["mean"], dtype=torch.float32)[:, None, None]
        self.std = torch.tensor(preprocess["std"], dtype=torch.float32)[:, None, None]

    def __call__(self, image: torch.Tensor | bytes | str | os.PathLike | Image.Image) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as F

        img = image if isinstance(image, torch.Tensor) else decode(image, self.max_pixels)
        # An int size resizes the shorter side with torchvision's rounding, as open_clip's transform does.
        target = self.resize or (self.size[0] if self.size[0] == self.size[1] else self.size)
        if min(img.shape[-2:]) != target or not isinstance(target, int):
            img = F.resize(img, target, interpolation=self.interpolation, antialias=True)
        img = F.center_crop(img, self.size)
        return (img.float() / 255 - self.mean) / self.std
