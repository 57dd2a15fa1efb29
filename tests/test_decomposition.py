"""The attention-pool mathematics: completeness, a dense independent reference, PC0, sink/bias, resolution."""
import pytest
import torch
import torch.nn.functional as F

import nha_plugin as nha
from nha_plugin.adapters import get_spec
from nha_plugin.decomposition import LEVELS, decompose_features
from nha_plugin.pool import constant_term, pair_directions

from conftest import images_for, make_tiny, scaled_tol

TARGET_KINDS = ("single", "set", "per_image")


def _target(kind, D, B, dtype, seed=3):
    g = torch.Generator().manual_seed(seed)
    shape = {"single": (D,), "set": (D, 5), "per_image": (B, D)}[kind]
    return torch.randn(*shape, generator=g).to(dtype)


def _summed(contrib, target, level, kind):
    """Sum of a level's scores plus the terms reported beside them."""
    parts = contrib.scores(target, level=level)
    keep = 2 if kind == "set" else 1
    total = parts.flatten(start_dim=keep).sum(-1) + contrib.bias_score(target)
    if level == "spatial":
        total = total + contrib.positional_score(target)
    if level in ("spatial", "token"):
        total = total + contrib.sink_score(target, level=level)
    return total


@pytest.fixture(scope="module")
def rn50_run(rn50_64):
    x = images_for(rn50_64)
    with torch.no_grad():
        y = rn50_64.encode_image(x)
    return x, y, nha.decompose(rn50_64, x)


def test_embedding_equals_encode_image_rn50(rn50_run):
    _, y, contrib = rn50_run
    assert torch.allclose(contrib.embedding, y, rtol=0, atol=1e-10 * y.abs().max())
    assert contrib.completeness_error().max() <= 1e-10
    assert contrib.pair_coefficients.shape == (2, 32, 2048) and contrib.attention.shape == (2, 32, 50)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("kind", TARGET_KINDS)
def test_completeness_float64_rn50(rn50_run, level, kind):
    x, y, contrib = rn50_run
    target = _target(kind, y.shape[1], x.shape[0], torch.float64)
    assert contrib.completeness_error(target, level=level).max() <= 1e-10
    e = target if kind != "single" else target[:, None]
    expected = (y @ e) if kind != "per_image" else (y * target).sum(-1)
    expected = expected if kind != "single" else expected[:, 0]
    assert torch.allclose(_summed(contrib, target, level, kind), expected, rtol=1e-10, atol=1e-12)


@pytest.fixture(scope="module")
def tiny_features(tiny64):
    x = images_for(tiny64, batch=3)
    with torch.no_grad():
        return x, get_spec(tiny64).trunk(x)


@pytest.mark.parametrize("sink", ["keep", "interpolate", "drop"])
@pytest.mark.parametrize("bias", ["own", "split"])
@pytest.mark.parametrize("level", LEVELS)
def test_completeness_modes_tiny(tiny64, tiny_features, sink, bias, level):
    x, feats = tiny_features
    contrib = decompose_features(get_spec(tiny64), feats, sink=sink, bias=bias)
    e = _target("set", 64, 3, torch.float64)
    assert contrib.completeness_error(e, level=level).max() <= 1e-10
    cos = contrib.scores(e, level=level, normalize=True).flatten(2).sum(-1) + contrib.bias_score(e, normalize=True)
    if level == "spatial":
        cos = cos + contrib.positional_score(e, normalize=True)
    if level in ("spatial", "token"):
        cos = cos + contrib.sink_score(e, level=level, normalize=True)
    with torch.no_grad():
        y = tiny64.encode_image(x)
    assert torch.allclose(cos, F.normalize(y, dim=-1) @ F.normalize(e, dim=0), atol=1e-10)


def test_completeness_float32_relative():
    model = make_tiny(torch.float32)
    x = images_for(model, batch=4, dtype=torch.float32)
    contrib = nha.decompose(model, x)
    with torch.no_grad():
        y = model.encode_image(x)
    assert ((contrib.embedding - y).norm(dim=-1) / y.norm(dim=-1)).max() <= 1e-4
    e = torch.randn(64, 3)
    for level in LEVELS:
        assert contrib.completeness_error(e, level=level).max() <= 1e-4


def test_dense_reference_per_pair(tiny64):
    """Pair contributions against a loop over (head, neuron) using torch's own multi-head attention weights."""
    x = images_for(tiny64, batch=2)
    visual = tiny64.visual
    pool = visual.attnpool
    contrib = nha.decompose(tiny64, x)
    with torch.no_grad():
        feats = get_spec(tiny64).trunk(x)
        B, C, h, w = feats.shape
        tok = feats.reshape(B, C, h * w).permute(2, 0, 1)
        tok = torch.cat([tok.mean(0, keepdim=True), tok]) + pool.positional_embedding[:, None]
        _, attn = F.multi_head_attention_forward(
            tok[:1], tok, tok, C, pool.num_heads, None,
            torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]), None, None, False, 0.0,
            pool.c_proj.weight, pool.c_proj.bias, training=False, need_weights=True,
            use_separate_proj_weight=True, q_proj_weight=pool.q_proj.weight, k_proj_weight=pool.k_proj.weight,
            v_proj_weight=pool.v_proj.weight, average_attn_weights=False)
        attn = attn[:, :, 0]                                  # (B, H, T)
        H, d = pool.num_heads, C // pool.num_heads
        dense = torch.zeros(B, H, C, pool.c_proj.out_features, dtype=x.dtype)
        for hh in range(H):
            wv = pool.v_proj.weight[hh * d:(hh + 1) * d]          # (d, C)
            wo = pool.c_proj.weight[:, hh * d:(hh + 1) * d]       # (D, d)
            for n in range(C):
                coeff = (attn[:, hh] * tok[:, :, n].T).sum(-1)   # (B,)
                dense[:, hh, n] = coeff[:, None] * (wo @ wv[:, n])[None]
        y = pool(feats)
    assert torch.allclose(contrib.attention, attn, atol=1e-12)
    assert torch.allclose(contrib.pair_contributions(), dense, atol=1e-12)
    assert torch.allclose(dense.sum((1, 2)) + constant_term(get_spec(tiny64)), y, atol=1e-10)


def test_pc0_of_dense_contributions_is_the_pair_direction(tiny64):
    x = images_for(tiny64, batch=12, seed=5)
    contrib = nha.decompose(tiny64, x)
    dense = contrib.pair_contributions(heads=slice(0, 2))       # (B, 2, C, D)
    u = pair_directions(get_spec(tiny64).detached(), heads=slice(0, 2))
    for hh, n in [(0, 0), (1, 7), (0, 100)]:
        centred = dense[:, hh, n] - dense[:, hh, n].mean(0)
        pc0 = torch.linalg.svd(centred, full_matrices=False).Vh[0]
        cos = pc0 @ F.normalize(u[hh, n], dim=0)
        assert abs(abs(cos.item()) - 1) < 1e-10


def test_scores_agree_with_dense_directions(tiny64):
    x = images_for(tiny64)
    contrib = nha.decompose(tiny64, x)
    e = torch.randn(64, dtype=torch.float64)
    dense = contrib.pair_contributions() @ e
    assert torch.allclose(contrib.scores(e, "pair"), dense, atol=1e-12)
    assert torch.allclose(contrib.scores(e, "head"), dense.sum(-1), atol=1e-12)
    assert torch.allclose(contrib.scores(e, "neuron"), dense.sum(-2), atol=1e-12)
    assert torch.allclose(contrib.head_contributions() @ e, dense.sum(-1), atol=1e-12)
    assert torch.allclose(contrib.neuron_contributions() @ e, dense.sum(-2), atol=1e-12)


@pytest.mark.parametrize("sink", ["keep", "interpolate"])
@pytest.mark.parametrize("bias", ["own", "split"])
def test_rest_score_is_the_named_terms(tiny64, tiny_features, sink, bias):
    """rest_score = bias_score + positional_score (spatial) + sink_score (token/spatial), and scores_and_rest
    returns exactly what scores and rest_score return apart."""
    contrib = decompose_features(get_spec(tiny64), tiny_features[1], sink=sink, bias=bias)
    e = _target("set", 64, 3, torch.float64)
    for level in LEVELS:
        named = contrib.bias_score(e)
        if level == "spatial":
            named = named + contrib.positional_score(e)
        if level in ("spatial", "token"):
            named = named + contrib.sink_score(e, level=level)
        rest = contrib.rest_score(e, level=level)
        torch.testing.assert_close(rest, named, rtol=0, atol=scaled_tol(named, 1e-12))
        both = contrib.scores_and_rest(e, level=level)
        assert torch.equal(both[0], contrib.scores(e, level=level)) and torch.equal(both[1], rest)


def test_sink_modes_edit_only_the_last_cell(tiny64):
    x = images_for(tiny64)
    e = torch.randn(64, dtype=torch.float64)
    keep = nha.decompose(tiny64, x, sink="keep").scores(e, "spatial")
    interp_c = nha.decompose(tiny64, x, sink="interpolate")
    interp = interp_c.scores(e, "spatial")
    drop_c = nha.decompose(tiny64, x, sink="drop")
    drop = drop_c.scores(e, "spatial")
    h, w = keep.shape[-2:]
    mask = torch.ones(h, w, dtype=torch.bool)
    mask[-1, -1] = False
    assert torch.equal(keep[:, mask], interp[:, mask]) and torch.equal(keep[:, mask], drop[:, mask])
    assert torch.allclose(interp[:, -1, -1], (keep[:, -1, -2] + keep[:, -2, -1] + keep[:, -2, -2]) / 3)
    assert torch.all(drop[:, -1, -1] == 0)
    assert torch.allclose(drop_c.sink_score(e), keep[:, -1, -1])
    assert torch.allclose(interp_c.sink_score(e), keep[:, -1, -1] - interp[:, -1, -1])
    assert torch.all(nha.decompose(tiny64, x).sink_score(e) == 0)


def test_bias_split_is_the_paper_convention(tiny64):
    x = images_for(tiny64)
    e = torch.randn(64, dtype=torch.float64)
    own = nha.decompose(tiny64, x, bias="own")
    split = nha.decompose(tiny64, x, bias="split")
    spec = get_spec(tiny64).detached()
    H, C, d = spec.num_heads, spec.num_neurons, spec.head_dim
    head_bias = torch.stack([spec.c_weight[:, i * d:(i + 1) * d] @ spec.v_bias[i * d:(i + 1) * d] for i in range(H)])
    share = (head_bias @ e)[:, None] / C + (spec.c_bias @ e) / (H * C)          # (H, 1)
    assert torch.allclose(split.scores(e, "pair") - own.scores(e, "pair"), share.expand(H, C)[None].expand(2, H, C))
    assert torch.all(split.bias_score(e) == 0)
    assert torch.allclose(split.scores(e, "pair").sum((1, 2)), own.total_score(e), atol=1e-10)


def test_other_resolution_interpolates_and_matches_timm(rn50_64, timm_rn50):
    """At 288 px the grid is 9x9; our interpolated decomposition equals timm's own resizing attention pool."""
    tm = timm_rn50
    x = images_for(288, batch=2)
    with pytest.warns(UserWarning, match="interpolated"):
        ours = nha.decompose(rn50_64, x)
    with torch.no_grad():
        ref = tm(x)
    assert ours.grid == (9, 9)
    assert ((ours.embedding - ref).norm(dim=-1) / ref.norm(dim=-1)).max() < 1e-6   # timm resizes in float32
    e = torch.randn(1024, dtype=torch.float64)
    assert ours.completeness_error(e, level="spatial").max() < 1e-10


def test_target_shape_errors(tiny64):
    contrib = nha.decompose(tiny64, images_for(tiny64))
    with pytest.raises(ValueError, match="D=64"):
        contrib.scores(torch.randn(63, dtype=torch.float64))
    with pytest.raises(ValueError, match="level"):
        contrib.scores(torch.randn(64, dtype=torch.float64), level="layer")
    with pytest.raises(TypeError, match="torch.Tensor"):
        contrib.scores([0.0] * 64)
    with pytest.raises(ValueError, match="sink"):
        nha.decompose(tiny64, images_for(tiny64), sink="mean")


def _paper_token_entries(model, x, e):
    """The NAD paper's code for token-level maps under the split bias, written out from the weights with dense
    loops (none of nha_plugin's helpers): token m gets ``sum_h a[h,m] W_o^h (W_v^h z_m + b_v^h) + b_o / T``, and
    the spatial cell t its own entry without the positional embedding, plus 1/hw of the mean token's
    (``sum_h (a[h,t] + a[h,0] / hw) W_o^h (W_v^h F_t + b_v^h) + b_o / hw``). Returns (token (B, T), spatial
    (B, h, w)) scores against e."""
    pool = model.visual.attnpool
    with torch.no_grad():
        feats = get_spec(model).trunk(x)
        B, C, h, w = feats.shape
        H, d = pool.num_heads, C // pool.num_heads
        flat = feats.reshape(B, C, h * w).transpose(1, 2)                           # (B, hw, C)
        z = torch.cat([flat.mean(1, keepdim=True), flat], dim=1) + pool.positional_embedding
        T = z.shape[1]
        Wq, Wk, Wv, Wo = pool.q_proj.weight, pool.k_proj.weight, pool.v_proj.weight, pool.c_proj.weight
        bq, bk, bv, bo = pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias, pool.c_proj.bias
        token = torch.zeros(B, T, dtype=x.dtype)
        spatial = torch.zeros(B, h * w, dtype=x.dtype)
        for b in range(B):
            for hh in range(H):
                rows = slice(hh * d, (hh + 1) * d)
                q = Wq[rows] @ z[b, 0] + bq[rows]
                logits = torch.stack([q @ (Wk[rows] @ z[b, m] + bk[rows]) for m in range(T)]) / d ** 0.5
                a = torch.softmax(logits, dim=0)
                for m in range(T):
                    token[b, m] += a[m] * (Wo[:, rows] @ (Wv[rows] @ z[b, m] + bv[rows])) @ e
                for t in range(h * w):
                    share = a[t + 1] + a[0] / (h * w)
                    spatial[b, t] += share * (Wo[:, rows] @ (Wv[rows] @ flat[b, t] + bv[rows])) @ e
        token += (bo @ e) / T
        spatial += (bo @ e) / (h * w)
    return token, spatial.view(B, h, w)


def test_split_bias_at_token_and_spatial_level_is_the_papers_code(tiny64):
    x = images_for(tiny64, batch=2, seed=7)
    e = torch.randn(64, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    token, spatial = _paper_token_entries(tiny64, x, e)
    split = nha.decompose(tiny64, x, bias="split")
    torch.testing.assert_close(split.scores(e, "token"), token, rtol=0, atol=scaled_tol(token, 1e-11))
    torch.testing.assert_close(split.scores(e, "spatial"), spatial, rtol=0, atol=scaled_tol(spatial, 1e-11))
    # still complete with the reported terms: positional (spatial) and nothing else under keep
    total = spatial.flatten(1).sum(1) + split.positional_score(e)
    torch.testing.assert_close(total, split.total_score(e), rtol=0, atol=scaled_tol(total, 1e-11))
    torch.testing.assert_close(token.sum(1), split.total_score(e), rtol=0, atol=scaled_tol(total, 1e-11))


def test_nan_and_zero_targets_are_refused_by_name(tiny64):
    contrib = nha.decompose(tiny64, images_for(tiny64))
    good = torch.randn(64, 4, dtype=torch.float64)
    cases = [(torch.full((64,), float("nan"), dtype=torch.float64), "target holds NaN"),
             (torch.zeros(64, dtype=torch.float64), "target is zero"),
             (good.index_fill(1, torch.tensor([2]), 0.0), "target column 2 is zero"),
             (good.index_fill(1, torch.tensor([1, 3]), float("inf")), "target column 1 holds NaN or inf"),
             (good[:, :2].T.index_fill(0, torch.tensor([1]), 0.0), "per-image target row 1 is zero")]
    for target, message in cases:
        for call in (contrib.scores, contrib.completeness_error, contrib.bias_score):
            with pytest.raises(ValueError, match=message):
                call(target)
    assert torch.isfinite(contrib.scores(good)).all()


@pytest.mark.parametrize("option", ["sink", "bias"])
def test_empty_mode_names_are_refused_not_defaulted(tiny64, option):
    with pytest.raises(ValueError, match=f"{option} must be one of"):
        nha.decompose(tiny64, images_for(tiny64), **{option: ""})


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_models_decompose_in_float32_within_the_stated_bound(dtype):
    """A bf16 / fp16 model: the decomposition's maths runs in float32 from the model's own low-precision layer4
    features, so it agrees with a float32 copy of the pool run on those features to float32 rounding; against the
    model's own low-precision pool the error stays below the dtype's machine epsilon (the bound the docstrings
    state); the Captum delta obeys ``eps * logit_scale * ||w||``; the caller's model is left as it was."""
    import copy

    from nha_plugin.harness import LinearReadout
    model = make_tiny(dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = images_for(model, batch=2, dtype=dtype)
    e = torch.randn(64, 3, generator=torch.Generator().manual_seed(5))
    contrib = nha.decompose(model, x)
    assert contrib.attention.dtype == contrib.pair_coefficients.dtype == torch.float32
    eps = torch.finfo(dtype).eps
    assert contrib.completeness_error().max() <= eps
    assert contrib.completeness_error(e, level="spatial").max() <= eps
    # independent float32 reference on the very same low-precision features: exact to float32 rounding, which
    # maths run in bf16 / fp16 could not be
    with torch.no_grad():
        feats = get_spec(model).trunk(x)
        y32 = copy.deepcopy(model.visual.attnpool).float()(feats.float())
    torch.testing.assert_close(contrib.embedding, y32, rtol=0, atol=scaled_tol(y32, 1e-5))
    assert (contrib.embedding - y32).norm(dim=-1).max() < 0.1 * eps * y32.norm(dim=-1).min()
    columns = F.normalize(e.to(dtype), dim=0)
    head = LinearReadout(model, columns, logit_scale=100.0, normalize=True)
    _, delta = nha.NeuronHeadAttribution(head).attribute(x, target=[0, 2], return_convergence_delta=True)
    assert delta.dtype == torch.float32 and delta.abs().max() <= eps * 100.0 * columns.float().norm(dim=0).max()
    after = model.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())
    assert not model.training
