"""Distribution-shift monitoring with the neuron x head decomposition (docs/methods.md §1).

A concept (a text such as ``"yellow"``) is tracked across groups of images (model years, months, sites)
by the part of each image embedding that the pairs most aligned with the concept write::

    PC0[h,n]   = sign[h,n] * u[h,n] / ||u[h,n]||                   (H, C, D)   u = pair_directions(spec)
    TopK(t)    = the k pairs with the largest <PC0[h,n], t>         t = the concept's text embedding,
                                                                    template-averaged, unit norm, NOT centred
    score(y)   = || sum_{(h,n) in TopK(t)} s[h,n] u[h,n] || / ||y||  per image (y = its embedding)

``sign`` is the paper's PC0 sign: +1 when the majority of the 50 images with the largest centred
``|s[h,n] - mean s[h,n]|`` have ``s[h,n]`` above its mean (:func:`pc0_signs`; ``nha_plugin.stats`` stores the
same rule as ``DatasetStats.pc0_sign``); without data every sign is +1.

Baselines, all on the same images and the same text embedding ``t``:

- ``cosine``: cos(y, t), the plain CLIP similarity.
- ``neurons``: a neuron's contribution ``sum_h s[h,n] u[h,n]`` is not rank-1, so its direction is the PC0 of
  its contributions over the reference group (centred; sign: the majority of the 50 largest centred
  contributions project positively; :func:`nha_plugin.text.unit_direction`). The ``k_neurons`` neurons with
  the largest ``<PC0_n, t>`` are kept and ``score = || sum_{n in top} sum_h s[h,n] u[h,n] || / ||y||``.
- ``heads``: the same with head contributions ``W_o^h W_v^h s[h, :]`` (bias excluded), PC0 per head over
  the reference group, the ``k_heads`` best heads kept.

Per image, each score is correlated with the concept's presence (point-biserial r); per group, the mean score
is correlated with the group's concept share. Dataset-level two-sample tests compare each group with the
reference group on the unit-normalised embeddings (MMD with a permutation p-value, a classifier two-sample
test) and on every score (two-sample Kolmogorov-Smirnov), as in "Failing Loudly" (Rabanser et al., 2019).

Rooms: :mod:`.units` (pair signs, unit directions, concept units and scores), :mod:`.data` (the grouped images),
:mod:`.monitor` (:func:`run_monitor`, resumable through a run folder), :mod:`.report` (Markdown, figure, JSON);
the statistics are :mod:`nha_plugin.applications.two_sample`, which knows nothing of CLIP.

Example::

    import nha_plugin as nha
    from nha_plugin.applications import shift
    from nha_plugin.scenes import years
    model, preprocess, tokenizer = nha.load_clip("scenes-rn")
    sampler = years(("colour", "yellow"), shares=(0.05, 0.15, 0.3, 0.5), n_per_group=100, seed=0)
    data = shift.ShiftData.from_sampler(sampler, concept="yellow")
    result = shift.run_monitor(model, preprocess, tokenizer, data, {"yellow": "yellow"})
    shift.write_report({"runs": [result]}, "shift_out", "yellow")       # .json, .md, .png

Only torch and numpy are needed (scipy is used by the tests as the independent reference).
"""
from ..two_sample import (binomial_sf, classifier_test, group_summary, ks_statistic, ks_test, median_bandwidth,
                          mmd2_unbiased, mmd_test, pearson, point_biserial)
from .data import ShiftData
from .monitor import run_monitor
from .report import METHOD_LABELS, markdown, plot, write_report
from .units import (METHODS, ConceptUnits, UnitDirections, concept_scores, pair_alignment, pc0_signs, select_units,
                    unit_directions)

__all__ = [
    "METHODS", "METHOD_LABELS", "UnitDirections", "ConceptUnits", "ShiftData", "pc0_signs", "pair_alignment",
    "unit_directions", "select_units", "concept_scores", "point_biserial", "pearson", "group_summary",
    "mmd2_unbiased", "median_bandwidth", "mmd_test", "ks_statistic", "ks_test", "binomial_sf", "classifier_test",
    "run_monitor", "markdown", "plot", "write_report",
]
