"""Text side of nha_plugin: word pools, cached text embeddings, batched OMP, TextSpan and ``nha describe``.

    import nha_plugin as nha
    from nha_plugin import text
    model, preprocess, tokenizer = nha.load_clip("scenes-rn")
    spec = nha.adapters.get_spec(model)
    words = text.build_dictionary(model, tokenizer, pool="words", templates="photo")   # cached on disk
    text.describe(spec, "pair:H3N17", words, k=10)       # {"words": [(word, coefficient), ...], ...}
    text.subconcepts(spec, 17, words)                    # a neuron's words beside each of its pairs'
    codes = text.sparse_decompose(directions, words.atoms, k=64)       # batched OMP, CPU or GPU
    text.text_span(head_contributions, words.embeddings, words.texts, m=20)

Modules, one job each:

- :mod:`~nha_plugin.text.pools`: the word pools (30k common English words from ``wordfreq``, filtered to
  lower-case ASCII alphabetic words of two letters or more; ImageNet class names; the ``scenes-rn``
  vocabulary; a user file) and the 80 CLIP ImageNet templates.
- :mod:`~nha_plugin.text.cache`: text embeddings in batches, with or without templates (normalise each
  template embedding, average, renormalise), cached on disk as checksummed safetensors keyed by the text
  tower's weights, the pool and the templates; a corrupt or mismatched cache file is recomputed.
- :mod:`~nha_plugin.text.omp`: :func:`sparse_decompose`, OMP with exactly k atoms per target, batched over
  targets, chunked, torch on CPU or GPU; agrees with scikit-learn's ``orthogonal_mp``.
  :func:`prepare_dictionary` centres over texts then normalises each text (default) or, as the reference
  did, each embedding dimension (``legacy_axis0``).
- :mod:`~nha_plugin.text.textspan`: :func:`text_span`, the greedy TextSpan basis (docs/methods.md §2) from a
  data matrix or a streamed covariance.
- :mod:`~nha_plugin.text.describe`: descriptions of pairs (from weights alone), heads and neurons (PC0 of
  their contributions when pair coefficients over a dataset are given) and the sub-concept view.
  :func:`head_text_span` runs TextSpan on an attention-pool head's contributions over a dataset.
- :mod:`~nha_plugin.text.all_pairs`: every pair of a model to JSON/Parquet, in resumable parts of a
  :class:`nha_plugin.runs.RunDir` keyed by the settings, dictionary and weights (``--fresh`` starts over).
- :mod:`~nha_plugin.text.groundtruth`: the planted-concept check on ``scenes-rn`` (pairs selected from scene
  data, without text, described by their concept's word; random pairs as the control).
- :mod:`~nha_plugin.cli.describe`: ``nha describe``.
"""
from .all_pairs import describe_all_pairs
from .cache import embed_texts
from .describe import (TextDictionary, build_dictionary, collect_coefficients, describe, describe_units,
                       head_text_span, neuron_directions, parse_unit, subconcepts, unit_direction)
from .omp import SparseCodes, prepare_dictionary, sparse_decompose
from .pools import (common_words, get_pool, get_templates, imagenet_classes, imagenet_templates, read_pool,
                    scenes_vocabulary)
from .textspan import TextSpanResult, text_span

__all__ = [
    "sparse_decompose", "prepare_dictionary", "SparseCodes", "text_span", "TextSpanResult", "embed_texts",
    "common_words", "imagenet_classes", "imagenet_templates", "scenes_vocabulary", "read_pool", "get_pool",
    "get_templates", "TextDictionary", "build_dictionary", "describe", "describe_units", "unit_direction",
    "neuron_directions", "parse_unit", "subconcepts", "describe_all_pairs", "collect_coefficients", "head_text_span",
]
