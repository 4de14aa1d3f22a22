"""Decoding image files safely: one policy for hostile files, shared by folder and webdataset sources.

Policy (the same everywhere):
- colour modes (grayscale, palette, CMYK, RGBA, 16-bit, ...) are converted to RGB by `transforms.to_rgb`;
  transparency is composited on white by default.
- undecodable files (zero bytes, truncated or corrupt data, non-images, decompression bombs) are *bad*.
- images whose short side is smaller than the crop are *bad* by default (`upscale_small=False`): upscaling them
  would train the tokenizer on blurry inputs. With `upscale_small=True` they are kept and the crop upsamples.
- a bad file is skipped and recorded as a `Skipped(path, reason)`, and a warning names it; with `strict=True`
  a `BadImageError` naming the file is raised instead.
PIL's global `LOAD_TRUNCATED_IMAGES` flag is left alone, so a truncated JPEG fails when fully decoded.
"""
from __future__ import annotations

import io
import logging
import os
from typing import NamedTuple

from PIL import Image

from data.transforms import to_rgb

logger = logging.getLogger(__name__)

# Extensions treated as images when scanning a folder (compared lower-case, so ImageNet's ".JPEG" matches).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm")


class Skipped(NamedTuple):
    """One input that was left out, and why."""

    path: str
    reason: str


class BadImageError(ValueError):
    """An input file that cannot be used; the message starts with its path."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def is_image_file(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS)


def decode_image(
    source: str | os.PathLike | bytes,
    min_size: int = 0,
    upscale_small: bool = False,
    alpha: str = "white",
    name: str | None = None,
) -> Image.Image:
    """Fully decode a file path or encoded bytes → RGB PIL image, or raise `BadImageError` with the reason."""
    label = name if name is not None else (str(source) if not isinstance(source, bytes) else "<bytes>")
    if isinstance(source, bytes):
        if len(source) == 0:
            raise BadImageError(label, "empty (0 bytes)")
        stream = io.BytesIO(source)
    else:
        if os.path.getsize(source) == 0:
            raise BadImageError(label, "empty (0 bytes)")
        stream = source
    try:
        with Image.open(stream) as image:
            image.load()  # full decode: truncated or corrupt data fails here, not later in the crop
            rgb = to_rgb(image, alpha=alpha)
            rgb.load()
    except BadImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise BadImageError(label, f"decompression bomb: {exc}") from exc
    except Exception as exc:  # PIL raises OSError, SyntaxError, EOFError, struct/zlib errors for broken data
        raise BadImageError(label, f"cannot decode: {type(exc).__name__}: {exc}") from exc
    if min(rgb.size) < min_size and not upscale_small:
        raise BadImageError(label, f"too small: {rgb.size[0]}x{rgb.size[1]} < crop {min_size}")
    return rgb


def peek_image(path: str, min_size: int = 0, upscale_small: bool = False) -> None:
    """Cheap index-time check (header only, no pixel decode): raises `BadImageError` for a file that cannot work.

    Catches zero-byte files, non-images, unreadable headers and too-small images; a file with a valid header
    but broken pixel data passes and is caught later by `decode_image`.
    """
    try:
        if os.path.getsize(path) == 0:
            raise BadImageError(path, "empty (0 bytes)")
        with Image.open(path) as image:
            width, height = image.size
    except BadImageError:
        raise
    except Exception as exc:
        raise BadImageError(path, f"cannot decode: {type(exc).__name__}: {exc}") from exc
    if min(width, height) < min_size and not upscale_small:
        raise BadImageError(path, f"too small: {width}x{height} < crop {min_size}")


def record_skip(skipped: list[Skipped], error: BadImageError, strict: bool) -> None:
    """Raise in strict mode; otherwise append to `skipped` and warn with the file and the reason."""
    if strict:
        raise error
    skipped.append(Skipped(error.path, error.reason))
    logger.warning("skipping %s (%s)", error.path, error.reason)
