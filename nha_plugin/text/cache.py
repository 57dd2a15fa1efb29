"""Text embeddings of a pool, computed in batches and cached on disk.

With templates, each text's embedding is the renormalised mean of its normalised template embeddings (the
CLIP zero-shot recipe). The cache key hashes the text tower's weights (every parameter and buffer outside
``visual``, exactly: :func:`nha_plugin.runs.module_fingerprint`), the tokenizer's class and context length, the
texts and the templates, so a retrained model or a changed pool never reads a stale file. Files are checksummed
safetensors written atomically (:func:`nha_plugin.files.save_tensors`; nothing is unpickled). A cache file that
is corrupt, or whose texts, templates, shape or dtype differ from what is asked for, is recomputed and
overwritten with a warning: it is a cache, never an error. Default directory: ``$NHA_CACHE_DIR`` or
``~/.cache/nha_plugin/text``.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..files import CorruptFileError, load_tensors, save_tensors
from ..readout import check_templates, encode_texts
from ..runs import module_fingerprint, texts_fingerprint

__all__ = ["embed_texts", "default_cache_dir", "cache_key", "CACHE_VERSION"]

CACHE_VERSION = 2            # 1: torch.save'd ``text-<key>.pt`` files (no longer read)
_META = "nha_text_cache"


def default_cache_dir() -> Path:
    """``$NHA_CACHE_DIR``, else ``~/.cache/nha_plugin/text``."""
    return Path(os.environ.get("NHA_CACHE_DIR", Path.home() / ".cache" / "nha_plugin" / "text"))


def cache_key(model: nn.Module, tokenizer: Callable, texts: Sequence[str],
              templates: Optional[Sequence[str]]) -> dict:
    """What identifies a cache file: the text tower's exact weights, the tokenizer, the texts and templates.

    Returns:
        ``{"version", "tower", "tokenizer", "texts", "templates"}``: str/int values (sha256 hex digests for
        the tower, texts and templates); the file name hashes the whole dict.
    """
    tokenizer_id = f"{type(tokenizer).__qualname__}:{getattr(tokenizer, 'context_length', '')}"
    return {"version": CACHE_VERSION, "tower": module_fingerprint(model, exclude=("visual.",), exact=True),
            "tokenizer": tokenizer_id, "texts": texts_fingerprint(texts),
            "templates": texts_fingerprint(templates or [])}


def _embed_dim(model: nn.Module) -> Optional[int]:
    """The text embedding width D when the model says it (open_clip's ``text_projection``), else None."""
    proj = getattr(model, "text_projection", None)
    if isinstance(proj, nn.Linear):
        return proj.out_features
    return proj.shape[-1] if isinstance(proj, Tensor) and proj.dim() == 2 else None


def _read_cache(path: Path, key: str, rows: int, dim: Optional[int]) -> Optional[Tensor]:
    """The cached unit embeddings (rows, dim) float32 at ``path``, or None (with a warning unless the file is
    missing) when it is absent, corrupt, or holds something other than what ``key`` (the JSON of
    :func:`cache_key`, sorted keys) and the shape ask for."""
    try:
        tensors, meta = load_tensors(path)
    except FileNotFoundError:
        return None
    except CorruptFileError:
        warnings.warn(f"text-embedding cache {path} is unreadable (empty, truncated, corrupted or not written by "
                      "nha_plugin); recomputing and overwriting it", stacklevel=3)
        return None
    emb = tensors.get("embeddings")
    problem = None
    if meta.get(_META) != key:
        problem = "it was written for other texts, templates or weights"
    elif emb is None or emb.dtype != torch.float32 or emb.dim() != 2 or emb.shape[0] != rows \
            or (dim is not None and emb.shape[1] != dim):
        got = "no embeddings" if emb is None else f"{emb.dtype} {tuple(emb.shape)}"
        problem = f"it holds {got}, expected torch.float32 ({rows}, {dim if dim is not None else 'D'})"
    elif not bool(torch.isfinite(emb).all()) or float((emb.norm(dim=1) - 1).abs().max()) > 1e-3:
        problem = "its rows are not finite unit vectors"
    if problem is not None:
        warnings.warn(f"text-embedding cache {path}: {problem}; recomputing and overwriting it", stacklevel=3)
        return None
    return emb


@torch.no_grad()
def _encode_trimmed(model: nn.Module, tokenizer: Callable, texts: Sequence[str]) -> Optional[Tensor]:
    """Unit text embeddings (N, D) from an open_clip CLIP run only up to the last pooled token.

    The text transformer is causal and pools at the end-of-text token, so padding after it cannot change
    the result: cutting the context to the longest text in the batch is exact and, for single words,
    ~10x cheaper than the full 77 tokens. Returns None for models this does not apply to."""
    needed = ("token_embedding", "positional_embedding", "transformer", "ln_final", "attn_mask")
    if not all(getattr(model, n, None) is not None for n in needed) \
            or getattr(model, "text_pool_type", None) != "argmax":
        return None
    device = model.positional_embedding.device
    tokens = tokenizer(list(texts)).to(device)
    last = int(tokens.argmax(dim=-1).max()) + 1
    cast = model.transformer.get_cast_dtype() if hasattr(model.transformer, "get_cast_dtype") else None
    x = model.token_embedding(tokens[:, :last])
    x = x.to(cast) if cast is not None else x
    x = x + model.positional_embedding[:last].to(x.dtype)
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:last, :last]))
    x = x[torch.arange(x.shape[0], device=device), tokens[:, :last].argmax(dim=-1)]
    proj = model.text_projection
    if proj is not None:
        x = proj(x) if isinstance(proj, nn.Module) else x @ proj
    return F.normalize(x.float(), dim=-1)


def _encode(model: nn.Module, tokenizer: Callable, texts: Sequence[str], batch_size: int) -> Tensor:
    out = []
    for i in range(0, len(texts), batch_size):
        chunk = list(texts[i:i + batch_size])
        emb = _encode_trimmed(model, tokenizer, chunk)
        out.append(emb if emb is not None else encode_texts(model, tokenizer, chunk, batch_size=batch_size))
    return torch.cat(out)


@torch.no_grad()
def _embed(model: nn.Module, tokenizer: Callable, texts: Sequence[str], templates: Optional[Sequence[str]],
           batch_size: int, progress: bool) -> Tensor:
    from tqdm.auto import tqdm
    per_text = len(templates) if templates else 1
    texts_per_batch = max(1, batch_size // per_text)
    out = []
    bar = tqdm(total=len(texts), desc="embedding texts", unit="text", disable=not progress)
    for i in range(0, len(texts), texts_per_batch):
        group = texts[i:i + texts_per_batch]
        if templates:
            prompts = [tpl.format(t) for t in group for tpl in templates]
            emb = _encode(model, tokenizer, prompts, batch_size)                       # unit rows
            emb = F.normalize(emb.view(len(group), per_text, -1).mean(dim=1), dim=-1)
        else:
            emb = _encode(model, tokenizer, list(group), batch_size)
        out.append(emb.float().cpu())
        bar.update(len(group))
    bar.close()
    return torch.cat(out)


def embed_texts(model: nn.Module, tokenizer: Callable, texts: Sequence[str],
                templates: Optional[Sequence[str]] = None, *, batch_size: int = 256,
                cache_dir: Union[str, Path, None, bool] = None, progress: bool = True) -> Tensor:
    """Unit-norm text embeddings (N, D), float32 on the CPU, cached on disk.

    Args:
        model: a whole CLIP model (with ``encode_text``).
        tokenizer: its tokenizer (as returned by ``load_clip``).
        texts: N texts (a pool from :mod:`nha_plugin.text.pools`).
        templates: format strings with ``{}``; each text is embedded with every template (each embedding
            normalised, averaged, renormalised). ``None``: the bare text.
        batch_size: prompts per forward pass of the text tower.
        cache_dir: directory of the cache; ``None`` -> :func:`default_cache_dir`; ``False`` -> no cache.
        progress: tqdm bar while embedding.

    Returns:
        (N, D) float32 unit rows on the CPU, from the cache when a valid file is there (a corrupt or
        mismatched one is recomputed with a warning and overwritten).
    """
    texts = list(texts)
    if not texts:
        raise ValueError("no texts to embed")
    if templates is not None:
        templates = check_templates(templates)
    if cache_dir is False:
        return _embed(model, tokenizer, texts, templates, batch_size, progress)
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = json.dumps(cache_key(model, tokenizer, texts, templates), sort_keys=True)
    path = directory / f"text-{hashlib.sha256(key.encode()).hexdigest()[:32]}.safetensors"
    emb = _read_cache(path, key, len(texts), _embed_dim(model))
    if emb is None:
        emb = _embed(model, tokenizer, texts, templates, batch_size, progress)
        save_tensors(path, {"embeddings": emb}, {_META: key})
    return emb
