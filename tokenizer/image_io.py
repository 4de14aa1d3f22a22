"""Images in and out of the models: PIL images, uint8 arrays or float tensors in; tensors, arrays or PIL out.

The models work on float tensors (B, 3, H, W) in [-1, 1]; these helpers let a notebook hand them PIL images
and get PIL images back, with the same rounding the sampling CLI writes PNGs with.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

OUTPUT_TYPES = ("pt", "np", "pil")


def image_batch(images: Any, device: torch.device | str | None = None) -> torch.Tensor:
    """(B, 3, H, W) float in [-1, 1] from a tensor of that form (returned as is), or from PIL images / uint8
    arrays (H, W, 3) (one or a list), moved to `device`."""
    if isinstance(images, torch.Tensor):
        return images
    items = images if isinstance(images, (list, tuple)) else [images]
    arrays = []
    for item in items:
        array = np.asarray(item.convert("RGB")) if hasattr(item, "convert") else np.asarray(item)
        if array.ndim != 3 or array.shape[-1] != 3 or array.dtype != np.uint8:
            raise ValueError(f"expected RGB images (PIL or uint8 arrays of shape (H, W, 3)), got an array of shape "
                             f"{array.shape} and dtype {array.dtype}")
        arrays.append(array)
    if len({a.shape for a in arrays}) != 1:
        raise ValueError(f"images of one batch must share a size, got {sorted({a.shape[:2] for a in arrays})}")
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (B, 3, H, W)
    return batch.to(device) if device is not None else batch


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats → uint8 with the rounding the sampling pipeline uses; shape kept."""
    return ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def to_output(images: torch.Tensor, output_type: str = "pt"):
    """[-1, 1] float images (B, 3, H, W) → "pt": uint8 tensor (B, 3, H, W); "np": uint8 array (B, H, W, 3);
    "pil": a list of PIL images."""
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
    pixels = to_uint8(images)
    if output_type == "pt":
        return pixels
    array = pixels.permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)
    if output_type == "np":
        return array
    from PIL import Image

    return [Image.fromarray(image) for image in array]
