"""Decoding and preprocessing images: one path for learning, evaluation and scoring.

Images are decoded by torchvision (libjpeg-turbo, libpng, libwebp) into uint8 tensors and preprocessed
with tensor ops equal to open_clip's eval transform: resize the shorter side (bicubic, antialiased),
centre crop, scale to [0, 1], normalise. The header is read first with PIL (lazily: no pixels) so that
decompression bombs are refused before any memory is spent on them.

With ``scaled_decode`` (``score --decode scaled``), a JPEG at least twice the size the transform
resizes to is decoded at a reduced scale (libjpeg's DCT scaling, 1/2, 1/4 or 1/8, through PIL's
``draft``): the largest that still covers the resize target, then resized as any other image. It is not
the default: the DCT's downscaling is not the antialiased bicubic resize, and on the starter bank, whose
tasks judge sharpness and noise at 64 pixels, the ranking moved too far (benchmarks/decode.py).

The transform is two halves: ``Preprocessor.crop`` (decode, resize, crop: uint8, in the DataLoader
workers, a quarter of float32's bytes to hand over) and ``Preprocessor.normalise`` (where the model
runs, in its dtype).

Every decoded image is 8-bit RGB with the pixels of its 8-bit equivalent: 16-bit images are scaled
(not clipped), alpha is dropped as open_clip's ``convert("RGB")`` drops it, and modes without a defined
8-bit range (32-bit integer or float pixels) are refused as ``unsupported`` rather than scored wrongly.
"""

from __future__ import annotations

import io
import math
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
    return decode_scaled(source, max_pixels)[0]


def decode_scaled(source: bytes | str | os.PathLike | Image.Image, max_pixels: int = MAX_PIXELS,
                  min_side: int | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
    """An RGB uint8 tensor [3, H, W] and the image's own (height, width). With ``min_side``, a JPEG whose
    shorter side is at least twice that is decoded at the smallest DCT scale whose shorter side is still
    at least ``min_side``."""
    if isinstance(source, Image.Image):
        return _to_rgb8(source), (source.height, source.width)
    if not isinstance(source, (bytes, bytearray)):
        with open(source, "rb") as f:
            source = f.read()
    header = _header(bytes(source), max_pixels)
    size = (header.height, header.width)
    if min_side and header.format == "JPEG" and min(size) >= 2 * min_side:
        return _load(header, draft_to=min_side), size
    return _decode_whole(source, header), size


def gpu_decodable(data: bytes, max_pixels: int = MAX_PIXELS) -> torch.Tensor | None:
    """A JPEG that nvJPEG can decode (YCbCr or grey): its bytes as a uint8 tensor; None for anything else,
    which is decoded on the CPU. Bombs are refused here, from the header, as on the CPU."""
    header = _header(data, max_pixels)
    ok = header.format == "JPEG" and header.mode in ("RGB", "L")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if ok else None


def _load(header: Image.Image, draft_to: int | None = None) -> torch.Tensor:
    """PIL's own decode, at a DCT scale whose shorter side is at least ``draft_to`` where given."""
    try:
        if draft_to:
            k = draft_to / min(header.size)
            header.draft("RGB", (math.ceil(header.width * k), math.ceil(header.height * k)))
        header.load()
        return _to_rgb8(header)
    except ImageDecodeError:
        raise
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageDecodeError("corrupt", str(e) or type(e).__name__) from None


def _decode_whole(source: bytes, header: Image.Image) -> torch.Tensor:
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
    return _load(header)


class Preprocessor:
    """open_clip's eval transform (resize shortest side, centre crop, normalise) on uint8 tensors.

    ``resize_size``, when given, is the shorter side before the crop (the paper authors' transform:
    Resize(256) then CenterCrop(224)); otherwise the shorter side is resized to the crop size.
    """

    def __init__(self, preprocess: dict[str, Any], max_pixels: int = MAX_PIXELS, scaled_decode: bool = False):
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
        # An int size resizes the shorter side with torchvision's rounding, as open_clip's transform does.
        self.target = self.resize or (self.size[0] if self.size[0] == self.size[1] else self.size)
        self.min_side = self.target if scaled_decode and isinstance(self.target, int) else None

    def __call__(self, image: torch.Tensor | bytes | str | os.PathLike | Image.Image) -> torch.Tensor:
        """The model's input: float32 [3, H, W], normalised."""
        return self.normalise(self.crop(image))

    def load(self, image: bytes | str | os.PathLike | Image.Image) -> tuple[torch.Tensor, tuple[int, int]]:
        """``crop``'s uint8 pixels, and the image's own (height, width)."""
        img, size = decode_scaled(image, self.max_pixels, self.min_side)
        return self.crop(img), size

    def crop(self, image: torch.Tensor | bytes | str | os.PathLike | Image.Image) -> torch.Tensor:
        """Decoded, resized and centre-cropped: uint8 [3, H, W]."""
        from torchvision.transforms.v2 import functional as F

        img = image if isinstance(image, torch.Tensor) else decode_scaled(image, self.max_pixels, self.min_side)[0]
        if min(img.shape[-2:]) != self.target or not isinstance(self.target, int):
            img = F.resize(img, self.target, interpolation=self.interpolation, antialias=True)
        return F.center_crop(img, self.size)

    def normalise(self, pixels: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """uint8 [..., 3, H, W] → the model's input in ``dtype``, on the pixels' device (computed in float32:
        bf16 holds 8 bits of mantissa, too few for (x / 255 − mean) / std)."""
        mean, std = self.mean.to(pixels.device), self.std.to(pixels.device)
        return ((pixels.float() / 255 - mean) / std).to(dtype)
