"""Streaming dataset statistics of the pair coefficients, in one pass, resumable and torchrun-aware.

Everything the dataset-level methods of docs/methods.md §1 need follows from the pair coefficients
s (B, H, C) alone, because a pair's contribution is ``s[h,n] u[h,n]`` with a fixed direction
(docs/methods.md §1). :func:`collect` streams a loader once and keeps, in float64:

- the count and the per-pair mean, merged batch by batch with Chan's parallel formulas (each batch is
  centred on its own mean first, so no large sums of squares ever cancel);
- the per-neuron co-moments of ``s[:, :, n]`` (C, H, H): their diagonal is the per-pair variance, and
  mapped through ``U_n = [u[0,n] ... u[H-1,n]]`` (D, H) they give the covariance of the neuron's
  contribution, hence its exact principal components without a D x D matrix per neuron;
- the summed squared norm of each head's centred contribution (H,) and, optionally, the head
  contributions' full co-moments (H, D, D) (input for TextSpan);
- per pair, the k largest and the k smallest coefficients with their sample indices (H, C, k). The k
  largest ``|s - m|`` for any m lie among those 2k values, so the paper's top-k centred norms (and the
  PC0 sign) are exact once the mean is known, after the single pass.

The mean embedding and the head means are derived from the pair mean (the decomposition is linear).
Under ``torch.distributed`` each process reads its shard and the statistics are merged exactly: counts,
weighted means and co-moments (with the parallel-axis correction ``n_r (m_r - m)(m_r - m)^T``) by
``all_reduce`` SUM in float64, top-k lists by ``all_gather`` and re-selection (ties: the smaller sample
index, so every selection is deterministic).

Rooms: :mod:`.accumulators` (:class:`DatasetStats`: moments, merges, derived statistics, files),
:mod:`.topk` (top-k selection), :mod:`.pcs` (neuron PCs), :mod:`.identity` (model fingerprint, format
version, :class:`StatsMismatchError`), :mod:`.collector` (:func:`collect`: batching, sharding, checkpoints).

Example::

    import nha_plugin as nha
    model, preprocess, tokenizer = nha.load_clip("scenes-rn")
    stats = nha.stats.collect(model, dataset, batch_size=32, checkpoint="stats.partial.safetensors",
                              resume=True)
    stats.save("stats.safetensors")
    stats.importance          # (H, C) the paper's pair importance
    stats.pc0_sign            # (H, C) +-1: PC0 = sign * u / ||u||
    stats.neuron_pcs(2)       # exact top-2 PCs of every neuron's contribution
"""
from .accumulators import DatasetStats
from .collector import collect
from .identity import FORMAT_VERSION, StatsMismatchError, spec_fingerprint
from .pcs import NeuronPCs
from .topk import TopDeviations

__all__ = ["DatasetStats", "NeuronPCs", "TopDeviations", "StatsMismatchError", "collect", "spec_fingerprint",
           "FORMAT_VERSION"]
