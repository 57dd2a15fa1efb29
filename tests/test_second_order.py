"""Second-order effects of ViT neurons: exactness against a frozen-statistics forward built from the model's own
modules, streaming statistics against brute force, ablations, segmentation counts and the CLI."""
import json
import math

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

from conftest import (TINY_VIT_CFG, assert_pickle_would_run, assert_topk_selection, images_for, make_tiny_vit,
                      scaled_tol, write_malicious_pickle)
from nha_plugin import files, runs, vit
from nha_plugin.applications import second_order as experiments
from nha_plugin.cli import neurons as cli
from nha_plugin.vit import second_order as so


def make_layerscale_vit(seed: int = 0):
    """The tiny ViT with layer scale (ls_1/ls_2 random gains) on top of the randomised LayerNorms and biases."""
    from conftest import randomise_vit
    torch.manual_seed(seed)
    cfg = dict(TINY_VIT_CFG, vision_cfg=dict(TINY_VIT_CFG["vision_cfg"], ls_init_value=0.5))
    model = randomise_vit(open_clip.model.CLIP(**cfg), seed + 1).eval().double()
    g = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for name, p in model.visual.named_parameters():
            if name.endswith("gamma"):
                p.copy_(torch.rand(p.shape, generator=g, dtype=p.dtype) + 0.5)
    return model


MODELS = {"default": lambda: make_tiny_vit(torch.float64),
          "custom": lambda: make_tiny_vit(torch.float64, block_type="custom"),
          "layerscale": make_layerscale_vit}


@pytest.fixture(scope="module", params=list(MODELS))
def model(request):
    return MODELS[request.param]()


# ---- an independent reference: the model's own modules, statistics frozen by hand -------------------------
def _frozen_forward(visual, images):
    """Per block: the stream entering it, its attention probabilities (recomputed from in_proj and checked
    against the module's own attention output), its LN_1 sigma and its post-GELU neurons."""
    x = visual._embeds(images)
    B, N, W = x.shape
    rec = []
    for blk in visual.transformer.resblocks:
        attn = blk.attn
        H = attn.num_heads
        d = W // H
        xn = blk.ln_1(x)
        sigma = (x.var(dim=-1, unbiased=False) + blk.ln_1.eps).sqrt()
        q, k, v = F.linear(xn, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
        split = lambda t: t.view(B, N, H, d).transpose(1, 2)  # noqa: E731
        probs = torch.softmax(split(q) @ split(k).transpose(-1, -2) / math.sqrt(d), dim=-1)
        mine = attn.out_proj((probs @ split(v)).transpose(1, 2).reshape(B, N, W))
        theirs = blk.attention(xn) if hasattr(blk, "attention") else attn(xn)
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-12)
        hidden = blk.mlp.gelu(blk.mlp.c_fc(blk.ln_2(x + blk.ls_1(mine))))
        rec.append({"x": x, "probs": probs, "sigma": sigma, "hidden": hidden})
        x = blk(x)
    return rec, x


def _reference_effects(model, images, layer):
    """phi (B, M, D) as the change of the output of the frozen-statistics network in which each later attention
    layer receives the neuron's write ``m_i[n] * ls_2 * c_proj[:, n]`` at its input (and nowhere else), so that
    exactly the single-head value paths are counted. LayerNorms keep their mean (linear) and freeze sigma."""
    visual = model.visual
    rec, x_out = _frozen_forward(visual, images)
    blocks = visual.transformer.resblocks
    src = blocks[layer]
    ls2 = src.ls_2.gamma if hasattr(src.ls_2, "gamma") else torch.ones(x_out.shape[-1], dtype=x_out.dtype)
    write = rec[layer]["hidden"].permute(2, 0, 1)[..., None] * (ls2 * src.mlp.c_proj.weight.T)[:, None, None, :]
    B, N, W = x_out.shape                                                     # write: (M, B, N, W)

    def frozen_ln(ln, v, sigma):
        return ln.weight * (v - v.mean(dim=-1, keepdim=True)) / sigma[..., None] + ln.bias

    delta = torch.zeros(write.shape[0], B, W, dtype=x_out.dtype)
    for lp in range(layer + 1, len(blocks)):
        blk, r = blocks[lp], rec[lp]
        H = blk.attn.num_heads

        def attn_cls(stream):                                                 # frozen attention at the class token
            vals = F.linear(frozen_ln(blk.ln_1, stream, r["sigma"]), blk.attn.in_proj_weight[2 * W:],
                            blk.attn.in_proj_bias[2 * W:])
            vals = vals.view(*vals.shape[:-1], H, W // H).transpose(-2, -3)   # (..., H, N, d)
            mixed = (r["probs"][:, :, 0:1, :] @ vals).transpose(-2, -3).reshape(*vals.shape[:-3], W)
            return blk.ls_1(blk.attn.out_proj(mixed))
        delta += attn_cls(r["x"] + write) - attn_cls(r["x"])
    cls = x_out[:, 0]
    sig_post = (cls.var(dim=-1, unbiased=False) + visual.ln_post.eps).sqrt()
    base = frozen_ln(visual.ln_post, cls, sig_post) @ visual.proj
    pert = frozen_ln(visual.ln_post, cls + delta, sig_post) @ visual.proj
    torch.testing.assert_close(base, model.encode_image(images), rtol=0, atol=1e-12)
    return (pert - base).permute(1, 0, 2)


@pytest.mark.parametrize("layer", [0, 1])
def test_effects_equal_frozen_reference(model, layer):
    images = images_for(model, 2)
    spec = vit.vit_spec(model)
    with torch.no_grad():
        ref = _reference_effects(model, images, layer)
        tr = vit.trace(spec, images)
        U = so.second_order_directions(spec, layer)
        phi = so.second_order_effects(tr, U, layer)
        c = so.second_order_coefficients(tr, layer)
    assert phi.shape == (2, spec.mlp_width, spec.output_dim)
    assert U.shape == (spec.mlp_width, (spec.layers - layer - 1) * spec.heads, spec.output_dim)
    assert float(ref.abs().max()) > 1e-3                                      # a non-trivial effect
    torch.testing.assert_close(phi, ref, rtol=0, atol=1e-10 * float(ref.abs().max()))
    torch.testing.assert_close(so.second_order_total(c, U), phi.sum(dim=1), rtol=0, atol=1e-12)
    sub = [5, 17, 200]
    phi_sub = so.second_order_effects(tr, so.second_order_directions(spec, layer, sub), layer, sub)
    torch.testing.assert_close(phi_sub, phi[:, sub], rtol=0, atol=1e-14)


def test_dense_loop_over_heads_and_tokens(tiny_vit64):
    """The formula of the module docstring as a plain loop over later layers, heads and tokens."""
    spec = vit.vit_spec(tiny_vit64)
    images = images_for(tiny_vit64, 1, seed=3)
    layer, n = 0, 11
    with torch.no_grad():
        tr = vit.trace(spec, images)
        phi = so.second_order_effects(tr, so.second_order_directions(spec, layer), layer)[0, n]
    blk = spec.blocks[layer]
    r = blk.ls_2 * blk.c_proj[:, n]
    P, g_post = spec.output_projection(), spec.ln_post.gamma
    ref = torch.zeros_like(phi)
    for lp in range(layer + 1, spec.layers):
        b = spec.blocks[lp]
        for h in range(spec.heads):
            head_dir = b.ls_1 * (b.W_o_heads[h] @ (b.W_v[h] @ (b.ln_1.gamma * (r - r.mean()))))
            out = (g_post * (head_dir - head_dir.mean())) @ P
            for i in range(spec.tokens):
                ref += tr.attn[lp][0, h, 0, i] * tr.mlp_hidden[layer][0, i, n] / tr.ln1_std[lp][0, i] * out
    ref = ref / tr.post_std[0]
    torch.testing.assert_close(phi, ref.detach(), rtol=0, atol=1e-13)


def test_last_layer_and_shape_errors(tiny_vit64):
    spec = vit.vit_spec(tiny_vit64)
    with pytest.raises(ValueError, match="last layer"):
        so.second_order_directions(spec, spec.layers - 1)
    with torch.no_grad():
        tr = vit.trace(spec, images_for(tiny_vit64, 1))
    with pytest.raises(ValueError, match="same layer"):
        so.second_order_effects(tr, so.second_order_directions(spec, 1), 0)


# ---- streaming statistics ---------------------------------------------------------------------------------
N_IMG, K_TOP, LAYER = 11, 4, 0


@pytest.fixture(scope="module")
def dataset(tiny_vit64):
    spec = vit.vit_spec(tiny_vit64)
    images = images_for(tiny_vit64, N_IMG, seed=5)
    with torch.no_grad():
        U = so.second_order_directions(spec, LAYER)
        phi = so.second_order_effects(vit.trace(spec, images), U, LAYER)       # (N, M, D) brute force
    return spec, images, U, phi


def _collect(spec, images, **kw):
    return so.collect_second_order(spec, LAYER, lambda s, e: images[s:e], len(images), batch_size=3, k=K_TOP,
                                   progress=False, **kw)


def test_stats_match_brute_force(dataset):
    spec, images, U, phi = dataset
    st = _collect(spec, images)
    mean = phi.mean(dim=0)
    torch.testing.assert_close(st.mean_effect(U), mean, rtol=0, atol=1e-12)
    norms = (phi - mean).norm(dim=2)                                           # (N, M)
    srt = norms.sort(dim=0, descending=True)
    torch.testing.assert_close(st.top_norms, srt.values[:K_TOP].T, rtol=0, atol=1e-12)
    assert_topk_selection(norms.T, st.top_index)                                 # near-ties may swap
    torch.testing.assert_close(st.threshold, srt.values[K_TOP - 1], rtol=0, atol=1e-12)
    c = torch.stack([so.second_order_coefficients(vit.trace(spec, images[i:i + 1]), LAYER)[0] for i in range(N_IMG)])
    torch.testing.assert_close(st.centred_norms(c, U), norms, rtol=0, atol=1e-10)
    # significant = strictly above the k-th largest training norm: the k-1 larger training images per neuron
    # (the k-th image itself sits on the threshold up to rounding, so it is left out of the comparison)
    sig, clear = st.significant(c, U), (norms - st.threshold).abs() > 1e-9
    assert torch.equal(sig[clear], (norms > st.threshold)[clear])
    assert torch.equal((sig & clear).sum(dim=0), torch.full((spec.mlp_width,), K_TOP - 1))


def test_several_layers_share_one_pass(dataset):
    spec, images, _, _ = dataset
    both = so.collect_second_order(spec, [1, 0], lambda s, e: images[s:e], N_IMG, batch_size=4, k=K_TOP,
                                   progress=False)
    one = so.collect_second_order(spec, 1, lambda s, e: images[s:e], N_IMG, batch_size=4, k=K_TOP, progress=False)
    assert sorted(both) == [0, 1] and both[1].heads == ["L2H0", "L2H1", "L2H2", "L2H3"]
    _assert_same_state(both[1], one)


def _assert_same_state(a, b) -> None:
    """Equal statistics up to rounding (another batch split or thread count rounds differently): moments within
    a tolerance scaled to their magnitude, the same top-norm values, and top indices that differ only where
    the norms they point at are equal within that tolerance."""
    sa, sb = a.state(), b.state()
    assert sa.keys() == sb.keys()
    for key, x in sa.items():
        y = sb[key]
        if key == "top_index":                                   # (M, k): per neuron, the top images
            tol = scaled_tol(sa["top_norms"])
            for row in range(x.shape[0]):
                na = dict(zip(x[row].tolist(), sa["top_norms"][row].tolist()))
                nb = dict(zip(y[row].tolist(), sb["top_norms"][row].tolist()))
                cut = min(sa["top_norms"][row].min(), sb["top_norms"][row].min())
                for i in na.keys() ^ nb.keys():                      # in one list only: a tie at the cut
                    assert abs(na.get(i, nb.get(i)) - cut) <= tol, (key, row, i)
        elif isinstance(x, torch.Tensor):
            torch.testing.assert_close(y, x, rtol=1e-10, atol=scaled_tol(x), msg=key)
        else:
            assert x == y, key


def test_pc1_matches_numpy_svd(dataset):
    spec, images, U, phi = dataset
    st = _collect(spec, images)
    fit = st.pc1(U)
    Xall = (phi - phi.mean(dim=0)).numpy()
    for n in (0, 3, 100, 255):
        X = Xall[:, n]
        top = X[np.argsort(-np.linalg.norm(X, axis=1), kind="stable")[:K_TOP]]
        _, s, vt = np.linalg.svd(top, full_matrices=False)
        p = top @ vt[0]
        votes = int((p > 0).sum()) - int((p < 0).sum())
        v = vt[0] if votes > 0 or (votes == 0 and p.sum() > 0) else -vt[0]
        np.testing.assert_allclose(fit["pc1"][n].numpy(), v, atol=1e-9)
        np.testing.assert_allclose(float(fit["explained_topk"][n]), s[0] ** 2 / (s ** 2).sum(), atol=1e-10)
        cov = X.T @ X / N_IMG
        evals = np.linalg.eigvalsh(cov)
        np.testing.assert_allclose(float(fit["explained_all"][n]), v @ cov @ v / evals.sum(), atol=1e-10)
        np.testing.assert_allclose(float(fit["explained_all_max"][n]), evals[-1] / evals.sum(), atol=1e-10)
        w = st.pc1(U, source="all")["pc1"][n].numpy()
        np.testing.assert_allclose(abs(w @ np.linalg.eigh(cov)[1][:, -1]), 1.0, atol=1e-9)


def test_resume_after_interruption(dataset, tmp_path):
    spec, images, U, _ = dataset
    full = _collect(spec, images)
    calls = []

    def flaky(s, e):
        calls.append(s)
        if len(calls) == 6:                                                    # dies in pass 2, batch 2
            raise KeyboardInterrupt
        return images[s:e]
    path = tmp_path / "stats.safetensors"
    with pytest.raises(ValueError, match="dataset_id"):                        # no resume key, no checkpoint
        so.collect_second_order(spec, LAYER, flaky, N_IMG, batch_size=3, k=K_TOP, path=path, progress=False)
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        so.collect_second_order(spec, LAYER, flaky, N_IMG, batch_size=3, k=K_TOP, path=path, progress=False,
                                dataset_id="test images")
    calls.clear()
    resumed = so.collect_second_order(spec, LAYER, flaky, N_IMG, batch_size=3, k=K_TOP, path=path, progress=False,
                                      dataset_id="test images")
    assert calls == [3, 6, 9]                                                  # only the unfinished batches
    _assert_same_state(full, resumed)
    calls.clear()
    again = so.SecondOrderStats.load(path)
    _assert_same_state(resumed, again)
    assert not calls


def test_resume_in_the_first_pass(dataset, tmp_path):
    spec, images, _, _ = dataset
    calls, killed = [], []

    def flaky(s, e):
        calls.append(s)
        if len(calls) == 3 and not killed:                                     # dies in pass 1, batch 2
            killed.append(s)
            raise KeyboardInterrupt
        return images[s:e]
    kw = dict(batch_size=3, k=K_TOP, path=tmp_path / "s.safetensors", progress=False, dataset_id="test images")
    with pytest.raises(KeyboardInterrupt):
        so.collect_second_order(spec, LAYER, flaky, N_IMG, **kw)
    calls.clear()
    resumed = so.collect_second_order(spec, LAYER, flaky, N_IMG, **kw)
    assert calls == [6, 9, 0, 3, 6, 9]                                         # pass 1 from batch 2, then pass 2
    _assert_same_state(_collect(spec, images), resumed)


def test_checkpoint_of_other_settings_or_images_is_refused(dataset, tmp_path):
    spec, images, _, _ = dataset
    path = tmp_path / "s.safetensors"
    kw = dict(k=K_TOP, path=path, progress=False)

    def source(x):
        return lambda s, e: x[s:e]
    so.collect_second_order(spec, LAYER, source(images), N_IMG, batch_size=3, dataset_id="a", **kw)
    with pytest.raises(runs.RunMismatchError, match="config.batch_size: found 3, expected 4"):
        so.collect_second_order(spec, LAYER, source(images), N_IMG, batch_size=4, dataset_id="a", **kw)
    with pytest.raises(runs.RunMismatchError, match='data.dataset_id: found "a", expected "b"'):
        so.collect_second_order(spec, LAYER, source(images), N_IMG, batch_size=3, dataset_id="b", **kw)
    other = so.collect_second_order(spec, LAYER, source(images), N_IMG, batch_size=4, dataset_id="b", fresh=True,
                                    **kw)
    _assert_same_state(other, _collect(spec, images))
    # a source that changes between the passes, or another dataset under the same name resumed mid-way
    swapped = images_for(images.shape[-1], N_IMG, seed=11)
    calls = []

    def changes(s, e):
        calls.append(s)
        return (images if len(calls) <= 4 else swapped)[s:e]
    with pytest.raises(runs.RunMismatchError, match="images 0..2 differ"):
        so.collect_second_order(spec, LAYER, changes, N_IMG, batch_size=3, dataset_id="c", fresh=True, **kw)

    def dies(s, e):
        if s == 6:
            raise KeyboardInterrupt
        return images[s:e]
    with pytest.raises(KeyboardInterrupt):
        so.collect_second_order(spec, LAYER, dies, N_IMG, batch_size=3, dataset_id="d", fresh=True, **kw)
    with pytest.raises(runs.RunMismatchError, match="images 0..2 differ"):
        so.collect_second_order(spec, LAYER, source(swapped), N_IMG, batch_size=3, dataset_id="d", **kw)


def test_statistics_files_round_trip_and_are_never_unpickled(dataset, tmp_path):
    spec, images, _, _ = dataset
    st = _collect(spec, images)
    st.save(tmp_path / "st.safetensors")
    again = so.SecondOrderStats.load(tmp_path / "st.safetensors")
    for key, value in st.state().items():
        got = again.state()[key]
        assert torch.equal(got, value) and got.dtype == value.dtype if torch.is_tensor(value) else got == value, key
    marker = tmp_path / "executed"
    for name in ("p.safetensors", "p.pt"):
        data = write_malicious_pickle(tmp_path / name, marker)
        with pytest.raises(files.CorruptFileError, match=name):
            so.SecondOrderStats.load(tmp_path / name)
        with pytest.raises(files.CorruptFileError, match=name):
            so.collect_second_order(spec, LAYER, lambda s, e: images[s:e], N_IMG, batch_size=3, k=K_TOP,
                                    path=tmp_path / name, progress=False, dataset_id="x")
    with pytest.raises(files.CorruptFileError, match="not a collect_second_order checkpoint"):
        so.collect_second_order(spec, LAYER, lambda s, e: images[s:e], N_IMG, batch_size=3, k=K_TOP,
                                path=tmp_path / "st.safetensors", progress=False, dataset_id="x")
    assert not marker.exists()
    assert_pickle_would_run(data, marker)


def test_ablations_exact(dataset):
    spec, images, U, phi_train = dataset
    st = _collect(spec, images)
    with torch.no_grad():                  # held-out images: none sits on a threshold up to rounding
        tr = vit.trace(spec, images_for(images.shape[-1], 5, seed=9))
    c = so.second_order_coefficients(tr, LAYER)
    phi = so.second_order_effects(tr, U, LAYER)
    y = tr.output
    mean = phi_train.mean(dim=0)
    torch.testing.assert_close(so.ablated_embeddings(y, c, U, st, "mean"), y - phi.sum(1) + mean.sum(0),
                               rtol=0, atol=1e-12)
    keep = ((phi - mean).norm(dim=2) > st.threshold)[..., None]
    torch.testing.assert_close(so.ablated_embeddings(y, c, U, st, "significant"),
                               y - phi.sum(1) + torch.where(keep, phi, mean).sum(1), rtol=0, atol=1e-12)
    v = st.pc1(U)["pc1"]
    recon = mean + ((phi - mean) * v).sum(-1, keepdim=True) * v
    torch.testing.assert_close(so.ablated_embeddings(y, c, U, st, "pc1", v), y - phi.sum(1) + recon.sum(1),
                               rtol=0, atol=1e-12)
    assert torch.equal(so.ablated_embeddings(y, c, U, st, "none"), y)
    assert 0 < int(keep.sum()) < keep.numel()


# ---- segmentation -----------------------------------------------------------------------------------------
def test_segmentation_counts_hand_case():
    """The second-order protocol: a min-max normalised map thresholded at 0.5 (the harness's counts with a fixed
    threshold; a map already in [0, 1] with min 0 and max 1 is left as it is)."""
    from nha_plugin.harness.metrics import segmentation_counts, segmentation_summary
    soft = np.array([[1.0, 0.625], [0.5, 0.0]])
    mask = np.array([[True, False], [True, False]])
    c = segmentation_counts(soft, mask, threshold=0.5)       # pred = [[1, 1], [0, 0]] (0.5 is not > 0.5)
    assert (c["correct"], c["inter1"], c["union1"], c["inter0"], c["union0"]) == (2, 1, 3, 1, 3)
    # AP: ranking 1.0(+), 0.625(-), 0.5(+), 0.0(-): precision at the two hits 1 and 2/3
    assert c["ap"] == pytest.approx((1 + 2 / 3) / 2)
    perfect = segmentation_counts(np.array([[1.0, 0.8], [0.6, 0.0]]), np.array([[True, True], [True, False]]),
                                  threshold=0.5)
    assert (perfect["correct"], perfect["inter1"], perfect["union1"], perfect["inter0"], perfect["union0"]) == \
        (4, 3, 3, 1, 1)
    s = segmentation_summary([c, perfect])
    assert s["pixacc"] == pytest.approx(6 / 8)
    assert s["miou"] == pytest.approx(np.mean([(1 + 1) / (3 + 1), (1 + 3) / (3 + 3)]))


def test_select_segmentation_neurons_by_abs_alignment():
    g = torch.Generator().manual_seed(0)
    pcs = {1: F.normalize(torch.randn(6, 4, generator=g), dim=1), 2: F.normalize(torch.randn(5, 4, generator=g), dim=1)}
    rows = F.normalize(torch.randn(4, 3, generator=g), dim=0)
    sel = experiments.select_segmentation_neurons(pcs, rows, top=4)
    for c in range(3):
        scores = {(lay, n): abs(float(pcs[lay][n] @ rows[:, c])) for lay in pcs for n in range(pcs[lay].shape[0])}
        assert sel[c] == sorted(scores, key=scores.get, reverse=True)[:4]


def test_neuron_maps(dataset):
    spec, images, _, _ = dataset
    tr = vit.trace(spec, images[:2])
    maps = so.neuron_maps(tr, 1, [3, 9], spec.grid)
    gh, gw = spec.grid
    assert maps.shape == (2, 2, gh, gw)
    assert torch.equal(maps[1, 1, 2, 3], tr.mlp_hidden[1][1, 1 + 2 * gw + 3, 9])


# ---- the command on a tiny model --------------------------------------------------------------------------
def test_cli_all_on_tiny_model(monkeypatch, tmp_path):
    model = make_tiny_vit(torch.float32)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    monkeypatch.setattr(cli, "_load_model", lambda *a: (model, tokenizer))
    out = tmp_path / "so"
    rc = cli.main(["neurons", "all", "--n-images", "12", "--k", "4", "--eval-images", "10", "--batch-size", "6",
                   "--top-neurons", "8", "--omp-k", "8", "--stats-dir", str(tmp_path / "stats"), "--quiet",
                   "--out", str(out)])
    assert rc == 0
    r = json.loads(out.with_suffix(".json").read_text())
    assert r["layer"] == 0 and r["K"] == 8 and r["eval_images"] == 10
    acc = r["ablation"]["accuracy"]
    assert set(acc) == {"none", "mean", "significant", "pc1"} and all(0 <= v <= 1 for v in acc.values())
    for key in ("neurons", "neurons_mean_threshold", "control", "heads_textspan"):
        assert 0 <= r["segmentation"][key]["pixacc"] <= 1
    assert (tmp_path / "so_segmentation.png").stat().st_size > 1000
    assert r["adversarial"]["attack"]["n"] == r["adversarial"]["control_random_words"]["n"]
    assert len(r["describe"]["neurons"]) == 10
    assert "Zero-shot accuracy" in out.with_suffix(".md").read_text()
    assert sorted(p.name for p in (tmp_path / "stats").iterdir()) == ["layers0-1_n12_k4.safetensors"]


def test_cli_refuses_bad_layer_and_classes(monkeypatch):
    model = make_tiny_vit(torch.float32)
    monkeypatch.setattr(cli, "_load_model", lambda *a: (model, open_clip.get_tokenizer("ViT-B-32")))
    with pytest.raises(SystemExit, match="no later attention layer"):
        cli.main(["neurons", "stats", "--layer", "2", "--quiet"])
    with pytest.raises(SystemExit, match="--classes scenes"):
        cli.main(["neurons", "ablate", "--classes", "imagenet", "--quiet"])


def _neurons_stats(monkeypatch, tmp_path, *extra):
    model = make_tiny_vit(torch.float32)
    monkeypatch.setattr(cli, "_load_model", lambda *a: (model, open_clip.get_tokenizer("ViT-B-32")))
    return cli.main(["neurons", "stats", "--n-images", "6", "--k", "2", "--batch-size", "3",
                     "--stats-dir", str(tmp_path / "stats"), "--quiet", *extra])


def test_cli_stats_cache_is_keyed_and_never_unpickled(monkeypatch, tmp_path, capsys):
    marker = tmp_path / "executed"
    stats = tmp_path / "stats" / "layers0_n6_k2.safetensors"
    assert _neurons_stats(monkeypatch, tmp_path) == 0 and stats.is_file()
    genuine = stats.read_bytes()
    capsys.readouterr()
    data = write_malicious_pickle(stats, marker)                               # the checkpoint it reads
    assert _neurons_stats(monkeypatch, tmp_path) == 2
    err = capsys.readouterr().err
    assert stats.name in err and len(err.strip().splitlines()) == 1 and "--fresh" in err
    stats.write_bytes(genuine)
    write_malicious_pickle(stats.with_suffix(".pt"), marker)                   # the old format's name: ignored
    assert _neurons_stats(monkeypatch, tmp_path) == 0
    assert _neurons_stats(monkeypatch, tmp_path, "--batch-size", "2") == 2     # another run's checkpoint
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "config.batch_size: found 3, expected 2" in err
    assert _neurons_stats(monkeypatch, tmp_path, "--batch-size", "2", "--fresh") == 0
    assert not marker.exists()
    assert_pickle_would_run(data, marker)
