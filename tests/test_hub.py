"""Hub ids load through huggingface_hub's local cache (offline, a cache the test builds on disk)."""
import shutil

import pytest
import torch

from tokenizer import EpsVAE, load_tokenizer


def _fake_hub_cache(root, repo_id: str, folder) -> None:
    """The layout `snapshot_download` resolves offline: models--owner--name/{refs/main, snapshots/<commit>/...}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)


def test_hub_id_loads_from_the_local_cache_offline(tmp_path, monkeypatch):
    model = EpsVAE.from_preset("tiny", "tiny")
    model.save_pretrained(tmp_path / "folder")
    cache = tmp_path / "hub"
    _fake_hub_cache(cache, "someone/tiny-eps-vae", tmp_path / "folder")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)

    loaded = load_tokenizer("someone/tiny-eps-vae")
    assert isinstance(loaded, EpsVAE)
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    with pytest.raises(FileNotFoundError, match="'someone/missing'.*Hugging Face Hub"):
        EpsVAE.from_pretrained("someone/missing")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        EpsVAE.from_pretrained(tmp_path / "not-a-folder")
