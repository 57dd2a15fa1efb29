"""load_clip: every weights format from files written here, the pickle opt-in, and fast offline failures."""
import fractions
import json
import time

import open_clip
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import nha_plugin as nha
from nha_plugin.models import read_state_dict

from conftest import TINY_CFG, images_for, make_tiny

NAME = "nha-tiny-rn"


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    d = tmp_path_factory.mktemp("cfg")
    (d / f"{NAME}.json").write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(d)
    model = make_tiny(torch.float32)
    x = images_for(model, dtype=torch.float32)
    with torch.no_grad():
        y = model.encode_image(x)
    return model, x, y


def _same_embedding(loaded, x, y):
    with torch.no_grad():
        out = loaded.encode_image(x)
    assert torch.allclose(out, y, atol=1e-6)
    assert nha.decompose(loaded, x).completeness_error().max() < 1e-5


def test_safetensors(registered, tmp_path):
    model, x, y = registered
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    loaded, preprocess, tokenizer = nha.load_clip(NAME, pretrained=str(path))
    _same_embedding(loaded, x, y)
    assert tokenizer(["a cat"]).shape == (1, 77)
    assert callable(preprocess)


def test_state_dict_with_wrapper_and_module_prefix(registered, tmp_path):
    model, x, y = registered
    path = tmp_path / "w.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in model.state_dict().items()}}, path)
    loaded, _, _ = nha.load_clip(NAME, pretrained=str(path))
    _same_embedding(loaded, x, y)


def test_pickle_needs_opt_in(registered, tmp_path):
    model, x, y = registered
    path = tmp_path / "w.pkl"
    torch.save({"state_dict": model.state_dict(), "meta": fractions.Fraction(1, 3)}, path)
    with pytest.raises(ValueError, match="allow_pickle=True"):
        nha.load_clip(NAME, pretrained=str(path))
    loaded, _, _ = nha.load_clip(NAME, pretrained=str(path), allow_pickle=True)
    _same_embedding(loaded, x, y)


class _Holder(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _torchscript_archive(state_dict: dict, path):
    """An archive shaped like OpenAI's: a scripted module whose state dict has OpenAI's keys and metadata."""
    root = _Holder()
    for key, value in state_dict.items():
        *parents, leaf = key.split(".")
        node = root
        for p in parents:
            if not hasattr(node, p):
                node.add_module(p, _Holder())
            node = getattr(node, p)
        node.register_buffer(leaf, value.clone())
    torch.jit.save(torch.jit.script(root), str(path))


def test_openai_torchscript_archive(registered, tmp_path):
    model, x, y = registered
    sd = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    sd.update(input_resolution=torch.tensor(128), context_length=torch.tensor(77), vocab_size=torch.tensor(49408))
    path = tmp_path / "tiny-openai.pt"
    _torchscript_archive(sd, path)
    assert "input_resolution" in read_state_dict(path)
    # architecture read from the archive itself (weights were stored in fp16, as OpenAI's are)
    loaded, _, tokenizer = nha.load_clip(str(path))
    with torch.no_grad():
        out = loaded.encode_image(x)
    assert torch.allclose(out, y, atol=5e-2 * y.abs().max())
    assert nha.decompose(loaded, x).completeness_error().max() < 1e-5
    # or into a named architecture
    named, _, _ = nha.load_clip(NAME, pretrained=str(path))
    assert torch.equal(named.visual.attnpool.q_proj.weight, loaded.visual.attnpool.q_proj.weight)


def test_local_dir(registered, tmp_path):
    model, x, y = registered
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CFG}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(tmp_path / "open_clip_model.safetensors"))
    loaded, _, _ = nha.load_clip(f"local-dir:{tmp_path}")
    _same_embedding(loaded, x, y)


def test_precision_and_bad_names(registered):
    model, _, _ = registered
    loaded, _, _ = nha.load_clip(NAME, precision="fp64")
    assert next(loaded.parameters()).dtype == torch.float64
    with pytest.raises(ValueError, match="precision"):
        nha.load_clip(NAME, precision="int8")
    with pytest.raises(ValueError, match="unknown model"):
        nha.load_clip("RN51")
    with pytest.raises(FileNotFoundError):
        nha.load_clip(NAME, pretrained="/nonexistent/w.safetensors")


def test_wrong_weights_for_architecture(registered, tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"visual.conv1.weight": torch.zeros(3, 3, 3, 3)}, str(path))
    with pytest.raises(ValueError, match="do not fit"):
        nha.load_clip(NAME, pretrained=str(path))


@pytest.mark.parametrize("offline_env", [True, False])
def test_missing_download_fails_fast_with_a_hint(monkeypatch, offline_env):
    if offline_env:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr("nha_plugin.models._hub_reachable", lambda *a, **k: False)
    start = time.monotonic()
    with pytest.raises(nha.PretrainedUnavailableError, match="pretrained='/path/to"):
        nha.load_clip("RN50", pretrained="openai")
    assert time.monotonic() - start < 20


def test_hf_hub_name_offline_points_to_local_dir(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(nha.PretrainedUnavailableError, match="local-dir:"):
        nha.load_clip("hf-hub:timm/resnet50_clip.openai")
