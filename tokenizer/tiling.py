"""Tiled decoding: decode large latents as overlapping tiles blended with linear ramps, so the decoder's memory
(the U-Net's attention in particular) grows with the tile, not the image. Used by `enable_tiling()` on the
tokenizers and by the generation pipeline's `tile` option.
"""
from __future__ import annotations

from typing import Callable

import torch



def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of `tile` cells covering `length` cells, consecutive tiles sharing >= `overlap`."""
    if tile >= length:
        return [0]
    if not 0 <= overlap < tile:
        raise ValueError(f"tile overlap must be in [0, {tile}), got {overlap}")
    starts = list(range(0, length - tile, tile - overlap))
    return starts + [length - tile]


def _ramp(size: int, ramp: int, rising: bool, falling: bool, device: torch.device) -> torch.Tensor:
    """1-D blending weights: linear ramps of `ramp` pixels at the interior edges, strictly positive. (size,)"""
    weight = torch.ones(size, device=device, dtype=torch.float32)
    if ramp > 0:
        edge = (torch.arange(ramp, device=device, dtype=torch.float32) + 0.5) / ramp  # (0, 1)
        if rising:
            weight[:ramp] = torch.minimum(weight[:ramp], edge)
        if falling:
            weight[-ramp:] = torch.minimum(weight[-ramp:], edge.flip(0))
    return weight


def tiled_decode(
    decode: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, tile: int, overlap: int, downsample: int
) -> torch.Tensor:
    """Decode (B, C, h, w) latents as overlapping `tile`×`tile` latent tiles, each decoded independently, blended
    with linear ramps over the overlaps (normalised by the summed weights). Memory grows with the tile, not the
    image, which is what lets the attention layers of the U-Net decoder handle images above the training size.
    """
    _, _, height, width = z.shape
    rows, cols = tile_starts(height, tile, overlap), tile_starts(width, tile, overlap)
    if len(rows) == 1 and len(cols) == 1:
        return decode(z)
    ramp = overlap * downsample
    out: torch.Tensor | None = None
    total = torch.zeros(1, 1, height * downsample, width * downsample, device=z.device)
    for top in rows:
        for left in cols:
            piece = decode(z[:, :, top:top + tile, left:left + tile]).float()  # (B, 3, t·f, t·f)
            th, tw = piece.shape[-2:]
            wy = _ramp(th, ramp, top > 0, top + tile < height, z.device)
            wx = _ramp(tw, ramp, left > 0, left + tile < width, z.device)
            weight = (wy[:, None] * wx[None, :])[None, None]  # (1, 1, t·f, t·f)
            if out is None:
                out = torch.zeros(piece.shape[0], piece.shape[1], height * downsample, width * downsample,
                                  device=z.device)
            y, x = top * downsample, left * downsample
            out[:, :, y:y + th, x:x + tw] += weight * piece
            total[:, :, y:y + th, x:x + tw] += weight
    return out / total  # (B, 3, H, W)
