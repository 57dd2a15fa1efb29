"""Text embeddings of a pool, computed in batches and cached on disk.

With templates, each text's embedding is the renormalised mean of its normalised template embeddings (the
CLIP zero-shot recipe). The cache key hashes the text tower's weights (every parameter and buffer outside
``visual``), the tokenizer's class, the pool and the templates, so a retrained model or a changed pool never
reads a stale file. Files are written atomically (temporary file + ``os.replace``) and reused across runs.
Default directory: ``$NHA_CACHE_DIR`` or ``~/.cache/nha_plugin/text``.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..readout import encode_texts

__all__ = ["embed_texts", "text_tower_fingerprint", "default_cache_dir", "cache_key"]


def default_cache_dir() -> Path:
    return Path(os.environ.get("NHA_CACHE_DIR", Path.home() / ".cache" / "nha_plugin" / "text"))


def text_tower_fingerprint(model: nn.Module) -> str:
    """sha256 over the names, shapes, dtypes and values of every tensor outside the image tower."""
    h = hashlib.sha256()
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    for name, t in sorted(tensors, key=lambda kv: kv[0]):
        if name.startswith("visual."):
            continue
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def cache_key(fingerprint: str, tokenizer: Callable, texts: Sequence[str],
              templates: Optional[Sequence[str]]) -> str:
    h = hashlib.sha256()
    h.update(fingerprint.encode())
    h.update(type(tokenizer).__qualname__.encode())
    h.update(str(getattr(tokenizer, "context_length", "")).encode())
    h.update("\x00".join(texts).encode())
    h.update(b"\x01")
    h.update("\x00".join(templates or ()).encode())
    return h.hexdigest()[:32]


@torch.no_grad()
def _encode_trimmed(model: nn.Module, tokenizer: Callable, texts: Sequence[str]) -> Optional[Tensor]:
    """Unit text embeddings (N, D) from an open_clip CLIP run only up to the last pooled token.

    The text transformer is causal and pools at the end-of-text token, so padding after it cannot change
    the result: cutting the context to the longest text in the batch is exact and, for single words,
    ~10x cheaper than the full 77 tokens. Returns None for models this does not apply to."""
    needed = ("token_embedding", "positional_embedding", "transformer", "ln_final", "attn_mask")
    if not all(getattr(model, n, None) is not None for n in needed) or getattr(model, "text_pool_type", None) != "argmax":
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
    """
    texts = list(texts)
    if not texts:
        raise ValueError("no texts to embed")
    if templates is not None and any("{}" not in t for t in templates):
        raise ValueError("every template needs one '{}' for the text")
    if cache_dir is False:
        return _embed(model, tokenizer, texts, templates, batch_size, progress)
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = cache_key(text_tower_fingerprint(model), tokenizer, texts, templates)
    path = directory / f"text-{key}.pt"
    if path.is_file():
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            if blob["texts"] == texts and blob["templates"] == list(templates or []):
                return blob["embeddings"]
        except Exception:   # a corrupt or foreign file is recomputed and overwritten, never trusted
            pass
    emb = _embed(model, tokenizer, texts, templates, batch_size, progress)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    torch.save({"texts": texts, "templates": list(templates or []), "embeddings": emb}, tmp)
    os.replace(tmp, path)
    return emb
