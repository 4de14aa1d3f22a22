"""Perceptual distances (tokenizer/perceptual.py): real pretrained weights, metric properties, freezing,
offline failure messages and strict key mapping."""
import pytest
import torch
import torch.nn.functional as F

from tokenizer.perceptual import (
    EFFNET_LITE_MEAN,
    EFFNET_LITE_STD,
    VGG16_FILE,
    MissingWeightsError,
    build_perceptual,
    effnet_lite0_package_file,
    load_effnet_lite0,
)

IMAGENET_CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.fixture(scope="module")
def effnet_distance():
    return build_perceptual("effnet-l0")


def _chelsea(size: int) -> torch.Tensor:
    """scikit-image's cat photo, centre-cropped and resized: (1, 3, size, size) in [0, 1]."""
    skimage_data = pytest.importorskip("skimage.data")
    image = torch.from_numpy(skimage_data.chelsea()).permute(2, 0, 1)[None].float() / 255  # (1, 3, 300, 451)
    height, width = image.shape[-2:]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    image = image[..., top : top + side, left : left + side]
    return F.interpolate(image, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)


def test_effnet_weights_are_imagenet_pretrained():
    model = load_effnet_lite0(num_classes_head=True)
    image = _chelsea(224)
    mean, std = torch.tensor(EFFNET_LITE_MEAN).view(1, 3, 1, 1), torch.tensor(EFFNET_LITE_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        probabilities = model((image - mean) / std).softmax(dim=1)[0]  # (1000,)
    top5 = probabilities.topk(5).indices.tolist()
    assert any(index in IMAGENET_CAT_CLASSES for index in top5), top5
    assert top5[0] in IMAGENET_CAT_CLASSES
    assert probabilities[list(IMAGENET_CAT_CLASSES)].sum() > 0.5


def test_effnet_key_mapping_fails_loudly_on_a_removed_key():
    state = torch.load(effnet_lite0_package_file(), map_location="cpu", weights_only=True)
    removed = "_blocks.3._expand_conv.weight"
    del state[removed]
    with pytest.raises(ValueError, match=r"missing \(1\): blocks\.2\.0\.conv_pw\.weight"):
        load_effnet_lite0(state_dict=state)


def test_effnet_key_mapping_fails_loudly_on_shape_and_extra_keys():
    state = torch.load(effnet_lite0_package_file(), map_location="cpu", weights_only=True)
    state["_fc.bias"] = torch.zeros(10)
    state["_extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError) as info:
        load_effnet_lite0(state_dict=state)
    message = str(info.value)
    assert "unexpected (1): _extra.weight" in message and "classifier.bias (10,)≠(1000,)" in message
    assert "\n" not in message


def test_distance_is_zero_on_identical_inputs(effnet_distance):
    x = _chelsea(64) * 2 - 1
    x = torch.cat([x, x.flip(-1)])  # (2, 3, 64, 64)
    torch.testing.assert_close(effnet_distance(x, x.clone()), torch.zeros(2), atol=1e-6, rtol=0)


def test_distance_grows_with_noise_level(effnet_distance):
    x = _chelsea(64).expand(2, -1, -1, -1) * 2 - 1  # (2, 3, 64, 64)
    noise = torch.randn_like(x)
    distances = torch.stack([effnet_distance(x, (x + level * noise).clamp(-1, 1)) for level in (0.05, 0.2, 0.5)])
    assert (distances[1:] > distances[:-1]).all(), distances
    assert (distances[0] > 0).all()


def test_small_inputs_are_upsampled_and_work(effnet_distance):
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert effnet_distance(x, torch.rand_like(x) * 2 - 1).shape == (2,)


def test_gradients_reach_inputs_but_not_parameters(effnet_distance):
    x = (_chelsea(64) * 2 - 1).requires_grad_(True)
    target = torch.zeros_like(x)
    effnet_distance(x, target).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in effnet_distance.parameters())


def test_network_stays_frozen_and_in_eval_inside_a_training_parent(effnet_distance):
    parent = torch.nn.ModuleDict({"head": torch.nn.Linear(2, 2), "perceptual": effnet_distance})
    parent.train()
    assert parent["head"].training
    assert not any(module.training for module in effnet_distance.modules())
    assert not any(p.requires_grad for p in effnet_distance.parameters())
    # BatchNorm running statistics must not move during a "training" forward.
    before = {k: v.clone() for k, v in effnet_distance.state_dict().items()}
    effnet_distance(torch.rand(2, 3, 64, 64) * 2 - 1, torch.rand(2, 3, 64, 64) * 2 - 1)
    for key, value in effnet_distance.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_none_returns_differentiable_zeros():
    distance = build_perceptual("none")
    x = torch.rand(3, 3, 8, 8, requires_grad=True)
    value = distance(x, torch.rand(3, 3, 8, 8))
    assert torch.equal(value, torch.zeros(3))
    value.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_unknown_network_and_bad_shapes_raise_value_error():
    with pytest.raises(ValueError, match="unknown perceptual network"):
        build_perceptual("vgg19")
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        build_perceptual("none")(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 4))


def test_lpips_without_vgg_weights_raises_one_line_before_building(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # forget any earlier torch.hub.set_dir
    with pytest.raises(MissingWeightsError) as info:
        build_perceptual("lpips-vgg")
    message = str(info.value)
    assert str(tmp_path / "hub" / "checkpoints" / VGG16_FILE) in message
    assert "--perceptual-weights" in message and "effnet-l0" in message
    assert "\n" not in message
    assert not any(tmp_path.rglob("*.pth"))  # nothing was downloaded


def test_lpips_with_missing_given_path_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match=VGG16_FILE):
        build_perceptual("lpips-vgg", weights_path=tmp_path / "nope.pth")


def _reference_lpips(vgg_features: torch.nn.Sequential, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """LPIPS v0.1 (Zhang et al. 2018) from torchvision's VGG16 `features` and lpips' shipped linear heads."""
    import pathlib

    import lpips

    heads = torch.load(
        pathlib.Path(lpips.__file__).parent / "weights" / "v0.1" / "vgg.pth", map_location="cpu", weights_only=True
    )
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    taps = [3, 8, 15, 22, 29]  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3

    def activations(image):
        out, h = [], (image - shift) / scale
        for index, layer in enumerate(vgg_features[: taps[-1] + 1]):
            h = layer(h)
            if index in taps:
                out.append(h / (h.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10))
        return out

    total = 0
    for level, (fx, fy) in enumerate(zip(activations(x), activations(y))):
        weighted = F.conv2d((fx - fy) ** 2, heads[f"lin{level}.model.1.weight"])  # (B, 1, h, w)
        total = total + weighted.mean(dim=(1, 2, 3))
    return total  # (B,)


def test_lpips_loads_a_given_vgg_file_and_matches_reference(tmp_path):
    from torchvision.models.vgg import cfgs, make_layers

    torch.manual_seed(3)
    features = make_layers(cfgs["D"]).eval()  # torchvision vgg16 `features`, random weights
    weights = tmp_path / VGG16_FILE
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, weights)
    distance = build_perceptual("lpips-vgg", weights_path=weights)
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        expected = _reference_lpips(features, x, y)
    torch.testing.assert_close(distance(x, y), expected, atol=1e-5, rtol=1e-4)
    assert not distance.train().training


def test_lpips_rejects_a_vgg_file_with_a_missing_tensor(tmp_path):
    from torchvision.models.vgg import cfgs, make_layers

    state = {f"features.{k}": v for k, v in make_layers(cfgs["D"]).state_dict().items()}
    del state["features.28.bias"]
    weights = tmp_path / VGG16_FILE
    torch.save(state, weights)
    with pytest.raises(ValueError, match=r"missing \(1\): slice5\.28\.bias"):
        build_perceptual("lpips-vgg", weights_path=weights)
