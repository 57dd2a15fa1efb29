"""One door in: :func:`load_clip` for models and :func:`decompose` for images.

``load_clip`` reads, offline first, the bundled models, open_clip, timm and transformers models by name, hub
repositories, local folders and local weight files (safetensors, state dicts, OpenAI TorchScript archives).
"""
from __future__ import annotations

import difflib
import importlib.util
import json
import os
import pickle
import socket
import warnings
import zipfile
from contextlib import contextmanager, nullcontext
from functools import partial
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
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".pkl", ".tar")


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in zf.namelist())


def _read_tensors(path: Path, allow_pickle: bool):
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    if _is_torchscript(path):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)   # torch.jit's deprecation notice: nothing to act on
            return dict(torch.jit.load(str(path), map_location="cpu").state_dict())
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if not allow_pickle and "Unsupported global" in str(err):
            raise ValueError(f"{path} is a pickle holding more than tensors; loading it can execute code. If you "
                             "trust the file pass allow_pickle=True, or better convert it to safetensors") from err
        if not allow_pickle:   # not a pickle of tensors at all: reported as unreadable
            raise
    return torch.load(str(path), map_location="cpu", weights_only=False)   # only with allow_pickle=True (opt-in)


def read_state_dict(path: Union[str, os.PathLike], allow_pickle: bool = False) -> dict:
    """Tensors from a weights file: safetensors, a torch state dict, or an OpenAI TorchScript archive, as
    {name: tensor} (a ``state_dict`` / ``model`` wrapper and ``module.`` prefixes removed). Arbitrary pickles
    are refused unless ``allow_pickle=True`` (loading a pickle can run code); an empty or unreadable file
    raises a ValueError saying so, a missing one FileNotFoundError."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path} (resolved to {path.resolve()})")
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty (0 bytes): an interrupted download or copy? Fetch the file again")
    try:
        sd = _read_tensors(path, allow_pickle)
    except ValueError:
        raise
    except Exception as err:   # each format's reader has its own errors; all mean "not a readable weights file"
        raise ValueError(f"{path} is not a readable weights file (safetensors, a torch state dict or an OpenAI "
                         f"TorchScript archive); it may be truncated or of another format: "
                         f"{type(err).__name__}: {str(err)[:200]}") from err
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if isinstance(sd, nn.Module):
        sd = sd.state_dict()
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, Tensor) for v in sd.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors (found {type(sd).__name__})")
    return {k[7:] if k.startswith("module.") else k: v for k, v in sd.items()}


_OPENAI_TEXT = ("text_projection", "token_embedding.weight", "ln_final.weight")
_FOREIGN = {"transformers": (("vision_model.", "text_model."), "put it in a folder with its config.json "
                             "(save_pretrained writes both) and pass the folder"),
            "timm": (("patch_embed.", "blocks.", "stem.", "stages.", "cls_token"), "name the architecture: "
                     "load_clip('timm:<architecture>', pretrained='{path}')"),
            "open_clip": (("visual.",), "name the open_clip architecture: load_clip('<architecture>', "
                          "pretrained='{path}') (see open_clip.list_models())")}


def _foreign_weights(sd: dict, path) -> str:
    """What a state dict that is not an OpenAI CLIP one holds, and what to pass instead."""
    library = next((k for k, (prefixes, _) in _FOREIGN.items() if any(n.startswith(prefixes) for n in sd)), None)
    todo = _FOREIGN[library][1].format(path=path) if library else ("expected OpenAI CLIP keys (visual.conv1.weight "
                                                                   "or visual.layer1.0.conv1.weight, text_projection)")
    return f"{path} holds {library or 'no CLIP'} weights ({len(sd)} tensors, e.g. {sorted(sd)[:3]}): {todo}"


def _load_clip_file(path: Path, allow_pickle: bool):
    """A whole OpenAI-format CLIP (TorchScript archive or state dict), its architecture read from the weights."""
    import open_clip
    from open_clip.model import build_model_from_openai_state_dict
    sd = read_state_dict(path, allow_pickle)
    tower = ("visual.proj", "visual.conv1.weight") if "visual.proj" in sd else ("visual.layer1.0.conv1.weight",)
    if not all(k in sd for k in _OPENAI_TEXT + tower):
        raise ValueError(_foreign_weights(sd, path))
    try:
        model = build_model_from_openai_state_dict(sd, cast_dtype=None).float()
    except (KeyError, IndexError, RuntimeError, ValueError) as err:
        raise ValueError(f"{path} has OpenAI CLIP keys but its tensors do not make a CLIP model: {err!r}") from err
    preprocess = open_clip.image_transform(model.visual.image_size, is_train=False)
    return model, preprocess, open_clip.tokenizer.SimpleTokenizer(context_length=model.context_length)


# ---- the hub ------------------------------------------------------------------------------------------
def _hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE") == "1" or not _hub_reachable()


@contextmanager
def _hub_offline_if_unreachable():
    """Make the hub client fail at once (instead of retrying for a minute) when the hub cannot be reached;
    the client's setting is put back afterwards."""
    import huggingface_hub.constants as hf_constants
    before = hf_constants.HF_HUB_OFFLINE
    hf_constants.HF_HUB_OFFLINE = before or _offline()
    try:
        yield
    finally:
        hf_constants.HF_HUB_OFFLINE = before


def _download_hint(name: str, pretrained: Optional[str]) -> str:
    what = f"{name!r}" + (f" with pretrained={pretrained!r}" if pretrained else "")
    todo = ("the repository (`huggingface-cli download <org/repo> --local-dir DIR`) and pass the folder: "
            "load_clip('DIR') (open_clip folders also as 'local-dir:DIR')" if name.startswith(("hf-hub:", "hf:"))
            else f"the weights and pass the file: load_clip({name.split('.')[0]!r}, pretrained='/path/to/weights"
                 ".safetensors' or an OpenAI '.pt' archive), or the repository's folder: load_clip('DIR')")
    return (f"could not obtain {what}: the model hub is unreachable from here and no cached copy was found. "
            f"Where there is network access, download {todo}")


def _hub_library(repo: str) -> str:
    """Which library a hub repository is for, from the config file it holds (cached copy first)."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
    online = not _offline()
    for filename in ("open_clip_config.json", "config.json"):
        path = try_to_load_from_cache(repo, filename)
        if not isinstance(path, str) and online:
            try:   # other errors (no such repository, gated) carry the hub's own message
                path = hf_hub_download(repo, filename)
            except EntryNotFoundError as err:   # the repository lacks the file, or (Local...) it is not cached
                if isinstance(err, LocalEntryNotFoundError):
                    raise PretrainedUnavailableError(_download_hint(f"hf-hub:{repo}", None)) from err
                continue
        if isinstance(path, str):
            return _folder_library(Path(path).parent)
    if online:
        raise ValueError(f"hub repository {repo!r} holds neither open_clip_config.json nor config.json")
    raise PretrainedUnavailableError(_download_hint(f"hf-hub:{repo}", None))


def _folder_library(folder: Path) -> str:
    """"open_clip", "timm" ("architecture" in config.json) or "transformers" ("model_type") for a folder."""
    if (folder / "open_clip_config.json").is_file():
        return "open_clip"
    try:
        data = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{folder} holds no readable model config: expected open_clip_config.json (open_clip), "
                         "or a config.json from transformers' save_pretrained or timm's save_for_hf; found "
                         f"{sorted(p.name for p in folder.iterdir())[:8]}") from err
    if "architecture" in data or "model_type" in data:
        return "timm" if "architecture" in data else "transformers"
    raise ValueError(f"{folder}/config.json names neither 'model_type' (transformers) nor 'architecture' (timm)")


# ---- the libraries ------------------------------------------------------------------------------------
def _closest(name: str, candidates) -> str:
    lower = {c.lower(): c for c in candidates}
    close = [lower[m] for m in difflib.get_close_matches(name.lower(), list(lower), n=3, cutoff=0.6)]
    return f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""


def _unknown_model(name: str) -> ValueError:
    import open_clip
    timm = importlib.util.find_spec("timm") and importlib.import_module("timm")
    note = f"; it is a timm architecture: write 'timm:{name}'" if timm and timm.is_model(name.split(".")[0]) else ""
    return ValueError(f"unknown model {name!r}{_closest(name, open_clip.list_models() + list(BUNDLED))}{note}. "
                      f"load_clip takes an open_clip architecture (open_clip.list_models()), a bundled {BUNDLED}, "
                      "'timm:<architecture>[.<tag>]', 'hf:<org/repo>' (transformers), 'hf-hub:<org/repo>', or a "
                      "local weights file or folder")


def _looks_like_path(text: str) -> bool:
    return "/" in text or os.sep in text or text.startswith(("~", ".")) or Path(text).suffix in WEIGHT_SUFFIXES


def _local_file(pretrained: Optional[str]) -> Optional[Path]:
    """``pretrained`` as an existing file; None for a tag (or None); a path naming nothing raises."""
    path = None if pretrained is None else Path(pretrained).expanduser()
    if path is not None and not path.is_file() and _looks_like_path(pretrained):
        raise FileNotFoundError(f"weights file not found: {pretrained} (resolved to {path.resolve()})")
    return path if path is not None and path.is_file() else None


def _fit(model: nn.Module, sd: dict, file: Path, what: str) -> nn.Module:
    """``model`` holding ``sd`` (every key of both), or a ValueError naming what does not fit."""
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as err:
        raise ValueError(f"weights in {file} do not fit {what}: {err}") from err
    if missing or unexpected:
        raise ValueError(f"weights in {file} do not fit {what}: {len(missing)} missing keys (e.g. {missing[:3]}), "
                         f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}). {_foreign_weights(sd, file)}")
    return model


def _library(module: str, extra: str):
    """Import an optional library, or say which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"this model needs {module}: pip install 'nha-plugin[{extra}]'") from err


def _load_open_clip(name: str, pretrained: Optional[str], allow_pickle: bool):
    import open_clip
    hub = name.startswith(("hf-hub:", "local-dir:"))
    if not hub and name not in open_clip.list_models():
        raise _unknown_model(name)
    file = _local_file(pretrained)
    if file is not None:
        sd = {k: v for k, v in read_state_dict(file, allow_pickle).items() if k not in _OPENAI_EXTRA_KEYS}
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None)
        _fit(model, {k: v.float() for k, v in sd.items()}, file, repr(name))
    else:
        if pretrained is not None and not hub and not open_clip.pretrained.is_pretrained_cfg(name, pretrained):
            tags = open_clip.list_pretrained_tags_by_model(name)
            raise ValueError(f"unknown pretrained tag {pretrained!r} for {name!r}{_closest(pretrained, tags)}; its "
                             f"tags: {tags or 'none'}; or pass a local weights file")
        try:
            with _hub_offline_if_unreachable():
                model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained)
        except (RuntimeError, OSError, ValueError) as err:
            if pretrained is None and not hub:
                raise
            raise PretrainedUnavailableError(_download_hint(name, pretrained)) from err
    return model, preprocess, open_clip.get_tokenizer(name)


def _load_timm_file(timm, name: str, file: Path, allow_pickle: bool) -> nn.Module:
    """timm's ``name`` holding a weights file through timm's converter (which reads CLIP state dicts too)."""
    model = timm.create_model(name, pretrained=False)
    sd = read_state_dict(file, allow_pickle)
    convert = getattr(importlib.import_module(type(model).__module__), "checkpoint_filter_fn", None)
    try:
        sd = convert(sd, model) if convert is not None else sd
    except (KeyError, IndexError, RuntimeError, ValueError) as err:
        raise ValueError(f"weights in {file} do not fit timm's {name!r}: {err!r}") from err
    head = model.pretrained_cfg.get("classifier")
    rows = sd[f"{head}.weight"].shape[0] if isinstance(head, str) and f"{head}.weight" in sd else 0
    if rows != model.num_classes:
        model = timm.create_model(name, pretrained=False, num_classes=rows)
    return _fit(model, sd, file, f"timm's {name!r}")


def _load_timm(source: str, pretrained: Optional[str], allow_pickle: bool):
    """timm ``arch[.tag]`` (a tag picks weights), with a weights file, or a ``local-dir:`` / ``hf-hub:`` source."""
    timm = _library("timm", "timm")
    from timm.data import create_transform, resolve_data_config
    file, own = _local_file(pretrained), source.startswith(("local-dir:", "hf-hub:"))
    name, tag = source, own
    if not own:
        arch, tag = timm.models.split_model_name_tag(source)
        if not timm.is_model(arch):
            raise ValueError(f"unknown timm architecture {arch!r}{_closest(arch, timm.list_models())}")
        if pretrained is not None and file is None:
            if tag and tag != pretrained:
                raise ValueError(f"two tags: {source!r} and pretrained={pretrained!r}; give one")
            tag = pretrained
        name = f"{arch}.{tag}" if tag else arch
        if tag and name not in timm.list_pretrained(name):
            known = [t.split(".", 1)[1] for t in timm.list_pretrained(f"{arch}.*")]
            raise ValueError(f"unknown timm tag {tag!r} for {arch!r}{_closest(tag, known)}; its tags: "
                             f"{known or 'none'}; or pass a local weights file")
    if file is not None and not own:
        model = _load_timm_file(timm, name, file, allow_pickle)
    elif not tag:
        model = timm.create_model(name, pretrained=False)
    else:
        try:
            with _hub_offline_if_unreachable():
                model = timm.create_model(name, pretrained=True)
        except (OSError, RuntimeError, ValueError) as err:
            if name.startswith("local-dir:"):
                raise ValueError(f"timm could not build the model in {name[10:]}: {err}") from err
            raise PretrainedUnavailableError(_download_hint(name if own else f"timm:{name}", None)) from err
    return model, create_transform(**resolve_data_config({}, model=model)), None


def _hf_pixels(processor, image) -> Tensor:
    """A PIL image through transformers' image processor: (3, H, W)."""
    return processor(images=image, return_tensors="pt")["pixel_values"][0]


def _hf_tokens(tokenizer, length: int, texts) -> Tensor:
    """Texts through transformers' tokenizer: input_ids (B, length), padded to CLIP's context length."""
    return tokenizer([texts] if isinstance(texts, str) else list(texts), padding="max_length", max_length=length,
                     truncation=True, return_tensors="pt")["input_ids"]


def _load_transformers(source: str, folder: bool):
    """A transformers model from a folder or a hub repo (cached copy first), its processor and tokenizer."""
    import open_clip
    transformers = _library("transformers", "transformers")
    kw = {"local_files_only": True} if folder or _offline() else {}
    try:
        config = transformers.AutoConfig.from_pretrained(source, **kw)
        arch = (getattr(config, "architectures", None) or [""])[0]
        cls = getattr(transformers, arch, None) or transformers.AutoModel
        model, info = cls.from_pretrained(source, output_loading_info=True, **kw)
    except OSError as err:
        if folder:
            raise ValueError(f"{source}: transformers cannot load the model there: {err}") from err
        raise PretrainedUnavailableError(_download_hint(f"hf:{source}", None)) from err
    bad = {k: sorted(map(str, v))[:3] for k in ("missing_keys", "mismatched_keys") if (v := info.get(k))}
    if bad:
        raise ValueError(f"weights in {source} do not fit its config ({arch}): {bad}; transformers would leave "
                         "those tensors at random values")
    try:
        processor = transformers.AutoImageProcessor.from_pretrained(source, **kw)
    except (OSError, ValueError):   # no preprocessor_config.json: CLIP's own processor at the model's size
        size = int(getattr(getattr(config, "vision_config", config), "image_size", 224))
        processor = transformers.CLIPImageProcessor(size=dict(shortest_edge=size),
                                                    crop_size=dict(height=size, width=size))
    text, tokenizer = getattr(config, "text_config", None), None
    if text is not None:
        length = int(getattr(text, "max_position_embeddings", 77))
        try:   # without tokenizer files transformers builds an empty vocabulary instead of failing: check its size
            hf_tokenizer = transformers.AutoTokenizer.from_pretrained(source, **kw)
            tokenizer = partial(_hf_tokens, hf_tokenizer, length) if len(hf_tokenizer) >= text.vocab_size else None
        except (OSError, ValueError, TypeError):
            pass
        if tokenizer is None and text.vocab_size == 49408:   # CLIP's BPE: open_clip's tokenizer gives the same ids
            tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=length)
    return model, partial(_hf_pixels, processor), tokenizer


# ---- the door -----------------------------------------------------------------------------------------
def _check_finite(model: nn.Module, source: str, precision: Optional[str] = None) -> nn.Module:
    """``model``, unless a weight is NaN/Inf (any decomposition would be NaN): a ValueError names the tensor."""
    for name, t in model.state_dict().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = f"tensor {name!r} of {source} has {int((~torch.isfinite(t)).sum())} of {t.numel()} values"
            raise ValueError(f"precision={precision!r} overflows: {bad} beyond {torch.finfo(t.dtype).max:.4g}; load "
                             "with precision='fp32' or 'bf16'" if precision else f"NaN/Inf weights: {bad} non-finite "
                             "(a damaged file or a diverged training run); refusing them")
    return model


def _finish(model: nn.Module, device, precision: str, source: str) -> nn.Module:
    model = _check_finite(model, source).to(device=device, dtype=PRECISIONS[precision]).eval()
    return _check_finite(model, source, precision) if precision in ("fp16", "bf16") else model


def _load(name: str, pretrained: Optional[str], allow_pickle: bool):
    """Route ``name`` to its library's loader: a prefix, else a folder's or hub repo's config file, else a file."""
    if name.startswith("timm:"):
        return _load_timm(name[5:], pretrained, allow_pickle)
    local = Path(name.split(":", 1)[1] if name.startswith(("hf:", "local-dir:")) else name).expanduser()
    if name.startswith("hf:"):
        return _load_transformers(str(local) if local.is_dir() else name[3:], local.is_dir())
    if name.startswith("hf-hub:") or local.is_dir():
        library = _hub_library(name[7:]) if name.startswith("hf-hub:") else _folder_library(local)
        source = name if name.startswith("hf-hub:") else f"local-dir:{local}"
        return (_load_open_clip(source, pretrained, allow_pickle) if library == "open_clip" else
                _load_timm(source, pretrained, allow_pickle) if library == "timm" else
                _load_transformers(source.split(":", 1)[1], local.is_dir()))
    if local.is_file():
        return _load_clip_file(local, allow_pickle)
    if name.startswith("local-dir:") or _looks_like_path(name):
        raise FileNotFoundError(f"no file or folder at {name!r} (resolved to {local.resolve()}); for a model on "
                                f"the Hugging Face hub write 'hf:{name}' (transformers) or 'hf-hub:{name}'")
    return _load_open_clip(name, pretrained, allow_pickle)


def load_clip(name: Union[str, os.PathLike] = "scenes-rn", pretrained: Union[str, os.PathLike, None] = None, *,
              device: Union[str, torch.device] = "cpu", precision: str = "fp32", allow_pickle: bool = False):
    """Load a CLIP model with its preprocess and tokenizer: ``(model, preprocess, tokenizer)``, offline first.

    Args:
        name: ``"scenes-rn"`` / ``"scenes-vit"`` (the bundled CLIP-ResNet / CLIP-ViT, offline); an open_clip
            architecture (``"RN50"``, ``"ViT-B-32"``, see ``open_clip.list_models()``);
            ``"timm:<architecture>[.<tag>]"`` (``"timm:vit_base_patch32_clip_224.openai"``,
            ``"timm:resnet50_clip.openai"``); ``"hf:<org/repo>"`` or ``"hf:<folder>"``, a transformers model
            (``"hf:openai/clip-vit-base-patch32"``, loaded as the class its config names); ``"hf-hub:<org/repo>"``
            (open_clip's scheme; a repository without open_clip_config.json goes to timm or transformers by
            its config.json); a folder (or ``"local-dir:<folder>"``) holding open_clip_config.json, a
            transformers config.json (``save_pretrained``) or a timm config.json (``save_for_hf``) with the
            weights; or a path to an OpenAI TorchScript archive / OpenAI-format state dict.
        pretrained: an open_clip or timm tag (``"openai"``), or a local weights file (safetensors, state dict,
            OpenAI archive; with ``timm:`` names timm's converter reads OpenAI / open_clip CLIP state dicts).
            ``None`` (and no tag in a ``timm:`` name) gives random initialisation.
        device, precision: where and in which dtype (fp32 | fp16 | bf16 | fp64) the model lives.
        allow_pickle: permit weights files that are arbitrary pickles (they can run code when loaded).

    Returns:
        model: the library's own model, in eval mode. :func:`decompose` reads the CLIP-ResNets of open_clip,
            OpenAI and timm (``resnet50_clip`` & co.); ``nha_plugin.vit`` the CLIP-ViTs of open_clip,
            transformers (``CLIPModel``, ``CLIPVisionModel(WithProjection)``) and timm.
        preprocess: PIL image -> (3, S, S) tensor (open_clip's transform, timm's ``create_transform`` or the
            transformers image processor).
        tokenizer: texts -> (B, context) int64 token ids: open_clip's; the repository's for a transformers
            model with a text tower (open_clip's, the same CLIP BPE, when there is none); ``None`` for timm and
            vision-only transformers models, which have no text tower.

    Raises:
        FileNotFoundError: a path that does not exist. ValueError: an unknown name or tag (with the closest
        valid ones); empty, unreadable or foreign weights (saying what they are and what to pass); weights
        holding NaN/Inf (naming a tensor). PretrainedUnavailableError: weights neither cached nor
        downloadable (within seconds when offline; says how to pass a local file or folder).
    """
    name, pretrained = (os.fspath(v) if isinstance(v, os.PathLike) else v for v in (name, pretrained))
    if not isinstance(name, str) or not isinstance(pretrained, (str, type(None))):
        raise TypeError(f"name and pretrained must be str or paths; got {type(name).__name__}, "
                        f"{type(pretrained).__name__}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    if name in BUNDLED:
        from .zoo import load_zoo_model
        model, preprocess, tokenizer = load_zoo_model(name)
    else:
        model, preprocess, tokenizer = _load(name, pretrained, allow_pickle)
    return _finish(model, device, precision, name), preprocess, tokenizer
