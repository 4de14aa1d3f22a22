"""The model-folder format shared by `EpsVAE`, `VAE` and `DiT` (diffusers-style, safetensors only).

A folder holds:
- `config.json`: `_class_name`, `model_type`, `format_version`, then the model's config (everything needed to
  rebuild it, plus what using it needs: latent statistics, class names, the tokenizer a DiT was trained on);
- `model.safetensors`: the weights to use, the EMA weights for a trained model;
- `raw.safetensors` (optional): the non-averaged weights, for fine-tuning;
- `README.md`: a generated model card.

`from_pretrained` takes a local folder or a Hugging Face Hub id (`owner/name`, resolved with
`huggingface_hub.snapshot_download`, which honours `HF_HUB_OFFLINE` and the local cache). Folders written by
format 1 (no `_class_name`; EMA possibly in `ema.safetensors`) still load.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

FORMAT_VERSION = 2
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
RAW_WEIGHTS_NAME = "raw.safetensors"
LEGACY_EMA_WEIGHTS_NAME = "ema.safetensors"  # format 1: an explicit EMA copy beside model.safetensors
CARD_NAME = "README.md"
WEIGHT_CHOICES = ("ema", "raw")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def resolve_model_dir(name_or_path: str | os.PathLike, what: str = "model",
                      files: Sequence[str] = (CONFIG_NAME, WEIGHTS_NAME, RAW_WEIGHTS_NAME, CARD_NAME),
                      subfolder: str | None = None) -> Path:
    """A local model folder, or the local snapshot of a Hub id (only `files`, in `subfolder` when given, are
    fetched: never a whole pipeline repository); one-line FileNotFoundError otherwise."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path / subfolder if subfolder else path
    text = str(name_or_path)
    if path.exists() or not _HUB_ID.match(text):
        raise FileNotFoundError(f"{what} directory {text!r} does not exist (not found on disk, and not a Hub id "
                                "owner/name)")
    from huggingface_hub import is_offline_mode, snapshot_download

    prefix = f"{subfolder}/" if subfolder else ""
    try:
        root = Path(snapshot_download(repo_id=text, allow_patterns=[prefix + name for name in files]))
    except Exception as error:  # noqa: BLE001 - offline, unknown id, no access: all one line naming the id
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        offline = ", HF_HUB_OFFLINE is set" if is_offline_mode() else ""
        raise FileNotFoundError(f"{what} {text!r} is not a local folder and could not be loaded from the "
                                f"Hugging Face Hub ({reason}{offline})") from None
    return root / subfolder if subfolder else root


def read_json_object(path: Path, holder: str) -> dict[str, Any]:
    """A folder's JSON config as a dict; one-line errors for a missing, unparsable or non-object file."""
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} is missing; {holder} needs {path.name}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{str(path)!r} is not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{str(path)!r} must hold a JSON object")
    return data


def read_config(directory: Path, model_types: Mapping[str, str]) -> tuple[str, dict[str, Any]]:
    """Read and check `config.json`; returns (model_type, config fields without the bookkeeping keys).

    model_types: the accepted `model_type` values → the class name to suggest in the error for another one.
    """
    path = directory / CONFIG_NAME
    data = read_json_object(path, "a model folder")
    data.pop("_class_name", None)
    model_type = data.pop("model_type", None)
    version = data.pop("format_version", 1)  # DiT folders of format 1 wrote no version
    if model_type not in model_types:
        raise ValueError(f"{str(path)!r} holds model_type {model_type!r}, not one of {sorted(model_types)}")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(f"{str(path)!r} has format_version {version!r}; this code reads up to {FORMAT_VERSION}")
    return model_type, data


def weights_file(directory: str | os.PathLike, weights: str = "ema") -> Path:
    """The file holding the requested weights: "ema" (what a trained model is used with) or "raw"."""
    directory = Path(directory)
    if weights not in WEIGHT_CHOICES:
        raise ValueError(f"weights must be one of {WEIGHT_CHOICES}, got {weights!r}")
    legacy_ema = directory / LEGACY_EMA_WEIGHTS_NAME
    if weights == "ema":
        return legacy_ema if legacy_ema.is_file() else directory / WEIGHTS_NAME
    if (directory / RAW_WEIGHTS_NAME).is_file():
        return directory / RAW_WEIGHTS_NAME
    if legacy_ema.is_file():  # format 1 with an EMA copy: model.safetensors held the raw weights
        return directory / WEIGHTS_NAME
    raise FileNotFoundError(f"{str(directory)!r} has no raw weights ({RAW_WEIGHTS_NAME}); it was saved with its "
                            "EMA weights only: load it with weights='ema'")


def weights_choice(directory: Path, weights: str, use_ema: bool | None) -> str:
    """`weights`, or what format 1's `use_ema` flag meant: False loaded model.safetensors, which held the raw
    weights in folders that also had an ema.safetensors copy."""
    if use_ema is None or use_ema:
        return weights
    return "raw" if (Path(directory) / LEGACY_EMA_WEIGHTS_NAME).is_file() else weights


def weights_fingerprint(directory: str | os.PathLike, weights: str = "ema") -> str:
    """sha256 (hex) of the weights file `weights_file` picks: how manifests and generators name a tokenizer."""
    import hashlib

    digest = hashlib.sha256()
    with open(weights_file(directory, weights), "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_weights(model: torch.nn.Module, directory: Path, weights: str = "ema") -> None:
    """Load the chosen weights into `model` strictly; one-line ValueError for a foreign or damaged file.

    Tensors are read on the CPU (safetensors takes no device index such as "cpu:0") and copied into the model's
    own parameters, so the model may already sit on any device.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = weights_file(directory, weights)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {str(path)!r} is missing")
    try:
        state = load_file(str(path))
        result = model.load_state_dict(state, strict=False)
    except (RuntimeError, OSError, SafetensorError) as error:  # corrupt file, tensors of the wrong shape
        first_line = str(error).strip().splitlines()[-1].strip() if str(error).strip() else type(error).__name__
        raise ValueError(f"cannot load {str(path)!r} into the model of {CONFIG_NAME}: {first_line}") from None
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{str(path)!r} does not match {CONFIG_NAME}: {len(result.missing_keys)} missing keys "
                         f"(e.g. {result.missing_keys[:3]}), {len(result.unexpected_keys)} unexpected "
                         f"(e.g. {result.unexpected_keys[:3]})")


def place(model: torch.nn.Module, device: str | torch.device | None, dtype: torch.dtype | str | None):
    """Move a loaded model to `device` / `dtype` (None keeps the CPU / float32 it was built in)."""
    if isinstance(dtype, str):
        dtype = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
                 "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}[dtype]
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return model


def _tensors_for_saving(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared or non-contiguous storage; each tensor gets its own contiguous CPU copy.
    return {name: tensor.detach().cpu().contiguous().clone() for name, tensor in state.items()}


def _replace_file(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def save_folder(directory: str | os.PathLike, class_name: str, model_type: str, config: Mapping[str, Any],
                state_dict: Mapping[str, torch.Tensor], raw_state_dict: Mapping[str, torch.Tensor] | None,
                card: str) -> Path:
    """Write a model folder (each file written under a temporary name, then renamed into place)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    payload = {"_class_name": class_name, "model_type": model_type, "format_version": FORMAT_VERSION, **config}
    _replace_file(directory / WEIGHTS_NAME, lambda p: save_file(_tensors_for_saving(state_dict), str(p)))
    raw_path = directory / RAW_WEIGHTS_NAME
    if raw_state_dict is not None:
        _replace_file(raw_path, lambda p: save_file(_tensors_for_saving(raw_state_dict), str(p)))
    elif raw_path.exists():  # a re-save without raw weights must not leave stale ones behind
        raw_path.unlink()
    (directory / LEGACY_EMA_WEIGHTS_NAME).unlink(missing_ok=True)
    _replace_file(directory / CONFIG_NAME, lambda p: p.write_text(json.dumps(payload, indent=2) + "\n"))
    _replace_file(directory / CARD_NAME, lambda p: p.write_text(card))
    return directory


def update_config(directory: str | os.PathLike, **fields: Any) -> None:
    """Set fields of an existing folder's config.json in place (atomic rename), e.g. latent statistics."""
    path = Path(directory) / CONFIG_NAME
    data = json.loads(path.read_text())
    data.update(fields)
    _replace_file(path, lambda p: p.write_text(json.dumps(data, indent=2) + "\n"))


def model_card(title: str, summary: str, facts: Mapping[str, Any], usage: str) -> str:
    """A short README.md: what the model is, the numbers known about it, and how to load it."""
    rows = "\n".join(f"| {key} | {value} |" for key, value in facts.items() if value is not None)
    return (f"# {title}\n\n{summary}\n\n| | |\n|---|---|\n{rows}\n\n## How to load\n\n```python\n{usage}\n```\n\n"
            "Weights are safetensors; `config.json` rebuilds the model with no other file. Written by the "
            "ε-VAE + DiT project (`save_pretrained`).\n")
