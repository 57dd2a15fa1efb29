"""Training-free semantic segmentation from the neuron x head decomposition (docs/methods.md §1), pure torch.

NAD segmentor, for P classes with unit text embeddings t_p (class names x templates, each embedded and normalised,
averaged, renormalised; then centred over the P classes and renormalised: "text centring", :mod:`.texts`):

1. Pair ranking: score[p, h, n] = <PC0[h, n], t_p> with PC0[h, n] = sign[h, n] u[h, n] / ||u[h, n]|| (u from
   :func:`nha_plugin.pool.pair_directions`; sign +1 unless a dataset's PC0 signs are given). TopK(p) = the k pairs
   with the largest signed score; ``mask[p, h, n]`` is 1 on them.
2. Head maps, per crop: L[p, m, h] = cos(t_p, c[m, h]) where c[m, h] is the contribution of token m through head h:
   ``a[h, m] W_o^h (W_v^h z_m + b_v^h)`` plus a share of the output bias. b_v^h stays inside each token's value (a
   head's attention weights sum to 1, so its tokens carry W_o^h b_v^h exactly once). The output bias b_o is shared
   in proportion to attention by default, ``a[h, m] b_o / H`` (``bias_share="attention"``), so a[h, m] drops out of
   the cosine; ``"uniform"`` splits it evenly, ``b_o / (H T)``. Either way the H*T entries sum to y exactly. Why the
   default: a trained pool's attention is peaked (scenes-rn: in float32 a[h, m] is exactly 0 for most tokens), and
   under the uniform share those tokens' entries are b_o alone, so their L is the same for every image.
3. Neuron maps: Z[m, n] = raw layer4 activation F_m[n] (no positional embedding).
4. logit[p, m] = (1/k) sum_h L[p, m, h] * (Z @ mask[p, h, :])[m]  (one matmul over all pairs), class token dropped.
   The attention-sink cell (the last spatial token) of L and Z is replaced by the mean of its W, N and NW
   neighbours (``sink="interpolate"``, as the paper does; for L, nha averages the neighbours' cosines, the paper's
   code their contribution vectors).
5. Grid -> bilinear upsampling to the crop; sliding window (default crop = the model's input size, stride = half),
   overlaps averaged; the short side is first resized to the crop size; logits resized bilinearly to the label's
   size; argmax over classes.

``Segmentor(..., preset="paper", pair_signs=...)`` reproduces the paper's code (uniform bias share, the sink cell's
contribution vectors interpolated, pairs ranked with the PC0 signs from data): :data:`.segmentor.PRESETS`,
docs/conventions.md.

Baselines share the class texts and the sliding window (:data:`METHOD_DESCRIPTIONS`): MaskCLIP for ResNet,
self-self attention, neurons-only, heads-only, and the floor "global" (each crop's zero-shot class painted over it).

Rooms: :mod:`.maps` (pair ranking and per-crop logits), :mod:`.texts` (class texts), :mod:`.segmentor` (the sliding
window), :mod:`.metrics` (confusion matrices, mIoU, bootstrap), :mod:`.scenes` (generated scenes with exact masks),
:mod:`.evaluation` (the resumable evaluation), :mod:`.report` (figure and markdown). Real data:
:class:`nha_plugin.datasets.pascal_context.PascalContext59`.

Example::

    model, preprocess, tokenizer = nha.load_clip("scenes-rn")
    ds = SceneSegmentation(50, seed=20_000)
    text = class_embeddings(model, tokenizer, ds.prompts())
    seg = Segmentor(model, text, methods=("nad", "maskclip"), k=417, preprocess=preprocess)
    result = evaluate(seg, ds, run_dir="seg_run")       # resumable; RunMismatchError if seg_run holds another run
    result["methods"]["nad"]["miou"]
"""
from .evaluation import ORACLE, ORACLE_DESCRIPTION, RUN_FORMAT, dataset_identity, evaluate, evaluation_key
from .maps import (DEFAULT_K, METHOD_DESCRIPTIONS, METHODS, PAPER_PAIR_SHARE, SINK_SPACES, contribution_head_maps,
                   crop_logits, nad_logits, neuron_maps, paper_k, pair_scores, top_pairs)
from .metrics import ConfusionMatrix, bootstrap_miou, class_iou, miou_from_matrices
from .report import plot_examples, results_markdown
from .scenes import SceneSegmentation, scene_prompts
from .segmentor import PRESET_DESCRIPTIONS, PRESETS, Segmentor, preset_settings, sliding_windows
from .texts import centre_texts, class_embeddings

__all__ = ["METHODS", "METHOD_DESCRIPTIONS", "ORACLE", "ORACLE_DESCRIPTION", "DEFAULT_K", "PAPER_PAIR_SHARE",
           "SINK_SPACES", "PRESETS", "PRESET_DESCRIPTIONS", "paper_k", "class_embeddings", "centre_texts",
           "pair_scores", "top_pairs", "neuron_maps", "contribution_head_maps", "nad_logits", "crop_logits",
           "sliding_windows", "preset_settings", "Segmentor", "ConfusionMatrix", "class_iou", "miou_from_matrices",
           "bootstrap_miou", "SceneSegmentation", "scene_prompts", "RUN_FORMAT", "dataset_identity",
           "evaluation_key", "evaluate", "plot_examples", "results_markdown"]
