"""One door in: :func:`load_clip` for models and :func:`decompose` for images.

``load_clip`` reads open_clip names and tags, ``hf-hub:`` / ``local-dir:`` names, the bundled
``scenes-rn`` (CLIP-ResNet) and ``scenes-vit`` (CLIP-ViT) models, and local weight files (safetensors, state
dicts, OpenAI TorchScript archives).
"""
from __future__ import annotations

import os
import pickle
import socket
import warnings
import zipfile
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Optional, Union

import torch
from torch import Tensor, nn

from .adapters import get_spec
from .decomposition import Contributions, decompose_features
from .images import check_image_batch
from .spec import AttentionPoolSpec
from .zoo import MODELS

__all__ = ["load_clip", "decompose", "validate_images", "read_state_dict", "PretrainedUnavailableError",
           "PRECISIONS"]

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}
BUNDLED = MODELS  # the planted-concept models shipped in nha_plugin/zoo: "scenes-rn", "scenes-vit" (offline)
_OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")


class PretrainedUnavailableError(RuntimeError):
    """Pretrained weights could not be found locally nor downloaded."""


# ---- images ------------------------------------------------------------------------------------------
def validate_images(images: Tensor, spec: AttentionPoolSpec) -> None:
    """Raise a ValueError/TypeError that says what to do when ``images`` cannot go through the model."""
    check_image_batch(images, device=spec.device, dtype=spec.dtype, preprocess_hint="the preprocess load_clip returns")
    if images.shape[-1] % 32 or images.shape[-2] % 32:
        raise ValueError(f"image sides must be multiples of 32 for a CLIP-ResNet; got {tuple(images.shape[-2:])}. "
                         f"Resize to {spec.image_size or 224} with the model's preprocess")


def decompose(model: Union[nn.Module, AttentionPoolSpec], images: Tensor, *, sink: str = "keep",
              bias: str = "own", grad: bool = False) -> Contributions:
    """Run the trunk to layer4 and decompose the attention pool exactly.

    Args:
        model: a CLIP-ResNet from open_clip, OpenAI ``clip`` or timm (whole model or image tower), or a spec.
        images: (B, 3, H, W), preprocessed. Other sizes than the model's interpolate the positional embedding.
        sink: ``"keep"`` (exact maps) | ``"interpolate"`` | ``"drop"`` for the attention-sink cell in maps.
        bias: ``"own"`` (its own term) | ``"split"`` (the paper's even split over pairs).
        grad: keep the autograd graph (off by default to save memory).

    Returns:
        :class:`Contributions`; ``contributions.embedding`` equals ``model.encode_image(images)``.

    Example::

        model, preprocess, tokenizer = nha.load_clip("scenes-rn")
        contrib = nha.decompose(model, images)
        contrib.scores(text_direction, level="head")          # (B, H)
    """
    spec = model if isinstance(model, AttentionPoolSpec) else get_spec(model)
    validate_images(images, spec)
    if not grad:
        spec = spec.detached()
    with (nullcontext() if grad else torch.no_grad()):
        features = spec.trunk(images)
        return decompose_features(spec, features, sink=sink, bias=bias)


# ---- weights -----------------------------------------------------------------------------------------
def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in zf.namelist())


def read_state_dict(path: Union[str, Path], allow_pickle: bool = False) -> dict:
    """Tensors from a weights file: safetensors, a torch state dict, or an OpenAI TorchScript archive.

    Arbitrary pickled objects are refused unless ``allow_pickle=True`` (loading a pickle can run code)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        sd = load_file(str(path))
    elif _is_torchscript(path):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)   # torch.jit's deprecation notice: nothing to act on
            sd = dict(torch.jit.load(str(path), map_location="cpu").state_dict())
    else:
        try:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            if not allow_pickle:
                raise ValueError(
                    f"{path} is a pickle holding more than tensors; loading it can execute code. If you trust "
                    "the file pass allow_pickle=True, or better convert it to safetensors") from err
            sd = torch.load(str(path), map_location="cpu", weights_only=False)
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if isinstance(sd, nn.Module):
        sd = sd.state_dict()
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return {k[7:] if k.startswith("module.") else k: v for k, v in sd.items()}


def _hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


@contextmanager
def _hub_offline_if_unreachable():
    """Make the hub client fail at once (instead of retrying for a minute) when the hub cannot be reached."""
    if os.environ.get("HF_HUB_OFFLINE") == "1" or _hub_reachable():
        yield
        return
    try:
        import huggingface_hub.constants as hf_constants
    except ImportError:
        yield
        return
    before = hf_constants.HF_HUB_OFFLINE
    hf_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hf_constants.HF_HUB_OFFLINE = before


def _download_hint(name: str, pretrained: Optional[str]) -> str:
    if name.startswith("hf-hub:"):
        return (f"could not obtain {name!r}: the model hub is unreachable from here and no cached copy was found. "
                "Download the repository (open_clip_config.json + weights) where there is network access and "
                "pass load_clip('local-dir:/path/to/that/folder')")
    return (f"could not obtain pretrained weights for {name!r} (pretrained={pretrained!r}): the model hub is "
            "unreachable from here and no cached copy was found. Download the weights where there is network "
            f"access and pass the file: load_clip({name!r}, pretrained='/path/to/weights.safetensors' "
            "or an OpenAI '.pt' archive)")


def _finish(model: nn.Module, device, precision: str) -> nn.Module:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    return model.to(device=device, dtype=PRECISIONS[precision]).eval()


def load_clip(name: str = "scenes-rn", pretrained: Optional[str] = None, *, device: Union[str, torch.device] = "cpu",
              precision: str = "fp32", allow_pickle: bool = False):
    """Load a CLIP model with its preprocess and tokenizer: ``(model, preprocess, tokenizer)``.

    Args:
        name: ``"scenes-rn"`` or ``"scenes-vit"`` (bundled planted-concept CLIP-ResNet / CLIP-ViT, offline;
            ``pretrained`` is ignored), an open_clip architecture (``"RN50"``, ``"RN50x16"``),
            ``"hf-hub:org/repo"``, ``"local-dir:/path"``, or a path to an OpenAI TorchScript archive /
            state dict (architecture read from the weights).
        pretrained: an open_clip tag (``"openai"``, ``"yfcc15m"``), or a local weights file (safetensors,
            state dict, OpenAI TorchScript archive). ``None`` gives random initialisation.
        device, precision: where and in which dtype (fp32 | fp16 | bf16 | fp64) the model lives.
        allow_pickle: permit weights files that are arbitrary pickles (they can run code when loaded).
    """
    import open_clip

    if name in BUNDLED:
        from .zoo import load_zoo_model
        model, preprocess, tokenizer = load_zoo_model(name)
        return _finish(model, device, precision), preprocess, tokenizer

    path_name = Path(name) if not name.startswith(("hf-hub:", "local-dir:")) else None
    if path_name is not None and path_name.is_file():
        from open_clip.model import build_model_from_openai_state_dict
        sd = read_state_dict(path_name, allow_pickle)
        model = build_model_from_openai_state_dict(sd, cast_dtype=None).float()
        size = model.visual.image_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        preprocess = open_clip.image_transform(size, is_train=False)
        tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=model.context_length)
        return _finish(model, device, precision), preprocess, tokenizer

    local_file = pretrained is not None and (Path(pretrained).is_file() or os.sep in str(pretrained))
    if local_file:
        sd = read_state_dict(pretrained, allow_pickle)
        for key in _OPENAI_EXTRA_KEYS:
            sd.pop(key, None)
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None)
        try:
            missing, unexpected = model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
        except RuntimeError as err:
            raise ValueError(f"weights in {pretrained} do not fit {name!r}: {err}") from err
        if missing or unexpected:
            raise ValueError(f"weights in {pretrained} do not fit {name!r}: {len(missing)} missing keys "
                             f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})")
    else:
        try:
            with _hub_offline_if_unreachable():
                model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained)
        except RuntimeError as err:
            if "Unknown model" in str(err) or "not found" in str(err).lower() and pretrained is None:
                raise ValueError(f"unknown model {name!r}; see open_clip.list_models() or use one of the "
                                 f"bundled models {BUNDLED}") from err
            raise PretrainedUnavailableError(_download_hint(name, pretrained)) from err
        except (OSError, ValueError) as err:
            if pretrained is None and not name.startswith("hf-hub:"):
                raise
            raise PretrainedUnavailableError(_download_hint(name, pretrained)) from err
    tokenizer = open_clip.get_tokenizer(name)
    return _finish(model, device, precision), preprocess, tokenizer
