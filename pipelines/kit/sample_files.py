"""The sample-folder format shared by sampling and FID: one PNG per image, named `NNNNNN_c<class>_s<seed>.png`,
and the ADM evaluator's `.npz` (`arr_0` uint8 (N, H, W, 3), `arr_1` int64 labels).

Every file is written under a temporary name and renamed when complete, so a killed run leaves no half file and
`png_is_complete` is all a resumed run needs to tell which images are done.
"""
from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path
from typing import Sequence

import numpy as np

SAMPLE_NAME = re.compile(r"^(\d{6,})_c(\d+)_s(\d+)\.png$")
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the IEND chunk every complete PNG ends with


def sample_filename(index: int, label: int, seed: int) -> str:
    return f"{index:06d}_c{label}_s{seed}.png"


def temporary_path(path: Path) -> Path:
    """A hidden name beside `path`, unique to this process: write there, then `os.replace` onto `path`."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def list_sample_images(folder: Path) -> list[Path]:
    """The sample PNGs `scripts/sample.py` wrote (NNNNNN_c*_s*.png, index order), else every image file."""
    from data.images import is_image_file

    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    samples = [p for p in files if SAMPLE_NAME.match(p.name)]
    return samples if samples else [p for p in files if is_image_file(p.name)]


def png_is_complete(path: Path, size: int | None = None) -> bool:
    """A finished RGB PNG (ends with its IEND chunk; `size`×`size` when given): cheap, reads the header only."""
    from PIL import Image

    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            if handle.tell() < len(_PNG_END):
                return False
            handle.seek(-len(_PNG_END), os.SEEK_END)
            if handle.read() != _PNG_END:
                return False
        with Image.open(path) as image:
            return image.format == "PNG" and image.mode == "RGB" and (size is None or image.size == (size, size))
    except (OSError, ValueError, SyntaxError):
        return False


def write_png_atomic(path: Path, image: np.ndarray) -> None:
    """(H, W, 3) uint8 → PNG under a temporary name, renamed when complete (a killed run leaves no half file)."""
    from PIL import Image

    tmp = temporary_path(path)
    Image.fromarray(image).save(tmp, format="PNG")
    os.replace(tmp, path)


def read_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))  # (H, W, 3) uint8


def write_adm_npz(path: Path, image_paths: Sequence[Path], labels: Sequence[int], size: int) -> None:
    """ADM evaluator format: `arr_0` uint8 (N, H, W, 3) and `arr_1` int64 labels, written image by image.

    `np.savez` would need all N images in memory (9.8 GB for 50k at 256²); this streams each PNG into the zip
    member `arr_0.npy` behind a standard .npy header, which `np.load` reads as usual.
    """
    tmp = temporary_path(path)
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
              "shape": (len(image_paths), size, size, 3)}
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        with archive.open("arr_0.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array_header_1_0(member, header)
            for image_path in image_paths:
                image = read_png(image_path)
                if image.shape != (size, size, 3):
                    raise ValueError(f"{image_path} is {image.shape}, expected ({size}, {size}, 3)")
                member.write(np.ascontiguousarray(image).tobytes())
        with archive.open("arr_1.npy", "w") as member:
            np.lib.format.write_array(member, np.asarray(labels, dtype=np.int64))
    os.replace(tmp, path)
