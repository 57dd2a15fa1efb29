"""Which model and file format a set of statistics belongs to, and the error raised when they do not match."""
from __future__ import annotations


import torch
from torch import Tensor

from ..runs import RunMismatchError, tensor_fingerprint
from ..spec import AttentionPoolSpec

__all__ = ["FORMAT_VERSION", "StatsMismatchError", "spec_fingerprint", "model_identity", "as_spec", "check_model"]

# 2: files written through nha_plugin.files (a sha256 per tensor), the weights fingerprint of
# runs.tensor_fingerprint, checkpoints keyed with runs.run_key. Format-1 files are refused with a pointer to
# collect again (their fingerprints cannot be compared with format 2's).
FORMAT_VERSION = 2


class StatsMismatchError(RunMismatchError):
    """Statistics (or a checkpoint) do not belong to this model, run configuration or format version.

    A :class:`nha_plugin.runs.RunMismatchError`, so whatever handles a refused run handles this one too."""


def pool_weights(spec: AttentionPoolSpec) -> list[Tensor]:
    """The attention pool's weight tensors (q, k, v, c weights and biases, then the positional embedding)."""
    return [getattr(spec, name) for name in AttentionPoolSpec.WEIGHT_NAMES]


def spec_fingerprint(spec: AttentionPoolSpec) -> str:
    """sha256 hex of the attention pool's head count and weights (:func:`nha_plugin.runs.tensor_fingerprint`).

    Weights are hashed as float32, so fp32 and fp64 copies of the same model agree; the head count is part of
    it because the same weights split into other heads give other pairs.

    Args:
        spec: the model's spec.

    Returns:
        64 hex characters.
    """
    return tensor_fingerprint(torch.tensor(spec.num_heads), *pool_weights(spec))


def model_identity(spec: AttentionPoolSpec) -> dict:
    """JSON-able identity of the model stored with statistics: fingerprint, H, C, D, grid and source."""
    return {"fingerprint": spec_fingerprint(spec), "num_heads": spec.num_heads, "num_neurons": spec.num_neurons,
            "output_dim": spec.output_dim, "grid_size": spec.grid_size, "source": spec.source}


def as_spec(model) -> AttentionPoolSpec:
    """``model`` itself when it is a spec, else its spec through the adapters (a CLIP-ResNet of any library)."""
    if isinstance(model, AttentionPoolSpec):
        return model
    from ..adapters import get_spec
    return get_spec(model)


def check_model(stored: dict, identity: dict) -> None:
    """Raise :class:`StatsMismatchError` unless two model identities (:func:`model_identity`) name the same
    weights and shapes (the source label may differ: one model loaded through two libraries)."""
    keys = ("num_heads", "num_neurons", "output_dim", "fingerprint")
    if all(stored.get(key) == identity.get(key) for key in keys):
        return

    def show(d: dict) -> str:
        return (f"H={d.get('num_heads')}, C={d.get('num_neurons')}, D={d.get('output_dim')}, "
                f"source {d.get('source')!r}, weights {str(d.get('fingerprint'))[:12]}")
    raise StatsMismatchError(
        f"these statistics were collected on another model ({show(stored)}); this model is {show(identity)}. "
        "Collect the statistics again for this model (nha stats / nha_plugin.stats.collect)")
