"""Training-free segmentation: NAD logits against dense references, baselines against torch's own ops, the
sliding window, the confusion-matrix metrics against scikit-learn, the scene labels, resume and the CLI."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import nha_plugin as nha
from nha_plugin.applications import segmentation as S
from nha_plugin.pool_maps import head_maps
from nha_plugin.cli.segment import main as segment_main

from conftest import assert_argmax_agrees, images_for, make_tiny

P = 3


@pytest.fixture(scope="module")
def tiny():
    return make_tiny(torch.float64, seed=3)


@pytest.fixture(scope="module")
def setup(tiny):
    """Random centred class texts, one image's layer4 features, the pool's own modules."""
    g = torch.Generator().manual_seed(7)
    text = S.centre_texts(torch.randn(P, tiny.visual.attnpool.c_proj.out_features, generator=g, dtype=torch.float64))
    x = images_for(tiny, batch=2)
    contrib = nha.decompose(tiny, x)
    return text, x, contrib


def _reference_entries(pool, contrib, share):
    """Dense (B, T, H, D) token x head contributions from the pool's own v_proj / c_proj weights and the
    decomposition's attention: a[h,m] W_o^h (W_v^h z_m + b_v^h) + bias share."""
    H = pool.num_heads
    C = pool.v_proj.in_features
    d = C // H
    z = nha.decomposition.tokens(contrib.features, contrib.positional_embedding)       # (B, T, C)
    v = pool.v_proj(z)                                                                  # (B, T, C)
    a = contrib.attention                                                               # (B, H, T)
    B, T = z.shape[:2]
    out = torch.zeros(B, T, H, pool.c_proj.out_features, dtype=z.dtype)
    for h in range(H):
        wo = pool.c_proj.weight[:, h * d:(h + 1) * d]
        head_out = v[:, :, h * d:(h + 1) * d] @ wo.T                                     # (B, T, D)
        if share == "uniform":
            out[:, :, h] = a[:, h, :, None] * head_out + pool.c_proj.bias / (H * T)
        else:
            out[:, :, h] = a[:, h, :, None] * (head_out + pool.c_proj.bias / H)
    return out


@pytest.mark.parametrize("share", ["attention", "uniform"])
def test_head_maps_equal_cosines_of_token_head_contributions(tiny, setup, share):
    text, x, contrib = setup
    pool = tiny.visual.attnpool
    with torch.no_grad():
        ref = _reference_entries(pool, contrib, share)
        # the entries are an exact decomposition of the model's embedding
        y = tiny.encode_image(x)
        assert (ref.sum(dim=(1, 2)) - y).abs().max() < 1e-10 * y.abs().max()
        cos = torch.einsum("bthD,pD->bpht", F.normalize(ref, dim=-1), F.normalize(text, dim=-1))[..., 1:]
        L = head_maps(contrib.spec, contrib.features, text, sink="keep", bias_share=share)
        assert L.shape == (2, P, pool.num_heads, 4, 4)
        assert (L.flatten(-2) - cos).abs().max() < 1e-10
        Li = head_maps(contrib.spec, contrib.features, text, sink="interpolate", bias_share=share)
    g = cos.view(*cos.shape[:-1], 4, 4)
    assert torch.allclose(Li[..., -1, -1], (g[..., -1, -2] + g[..., -2, -1] + g[..., -2, -2]) / 3, atol=1e-12)
    assert torch.equal(Li[..., :-1, :], L[..., :-1, :])


def _independent_pair_scores(pool, text):
    """<u[h,n] / ||u[h,n]||, t_p> per head from the pool's modules, (P, H, C)."""
    H, C = pool.num_heads, pool.v_proj.in_features
    d = C // H
    rows = []
    for h in range(H):
        u = pool.c_proj.weight[:, h * d:(h + 1) * d] @ pool.v_proj.weight[h * d:(h + 1) * d]    # (D, C)
        rows.append((F.normalize(u.T, dim=-1) @ text.T).T)                                       # (P, C)
    return torch.stack(rows, dim=1)


def test_top_pairs_rank_by_signed_pc0_alignment(tiny, setup):
    text, _, contrib = setup
    pool, k = tiny.visual.attnpool, 50
    with torch.no_grad():
        ref = _independent_pair_scores(pool, text)
        mask = S.top_pairs(contrib.spec, text, k)
        flipped = S.top_pairs(contrib.spec, text, k, pair_signs=-torch.ones(pool.num_heads, pool.v_proj.in_features))
    assert (S.pair_scores(contrib.spec, text) - ref).abs().max() < 1e-12
    for p in range(P):
        top = set(ref[p].flatten().topk(k).indices.tolist())
        bottom = set((-ref[p]).flatten().topk(k).indices.tolist())
        assert set(mask[p].flatten().nonzero()[:, 0].tolist()) == top
        assert set(flipped[p].flatten().nonzero()[:, 0].tolist()) == bottom
    with pytest.raises(ValueError, match="pair_signs must be"):
        S.top_pairs(contrib.spec, text, k, pair_signs=torch.ones(3, 3))


def test_k_larger_than_pairs_is_clipped_with_a_warning(setup):
    text, _, contrib = setup
    H, C = contrib.spec.num_heads, contrib.spec.num_neurons
    with pytest.warns(UserWarning, match="exceeds"):
        mask = S.top_pairs(contrib.spec, text, H * C + 1)
    assert torch.equal(mask, torch.ones(P, H, C, dtype=mask.dtype))


def test_nad_and_neuron_logits_equal_a_dense_loop_over_pairs(tiny, setup):
    text, _, contrib = setup
    spec, k = contrib.spec, 40
    with torch.no_grad():
        mask = S.top_pairs(spec, text, k)
        L = head_maps(spec, contrib.features, text)
        Z = S.neuron_maps(contrib.features)
        out = S.crop_logits(spec, contrib.features, text, ["nad", "neurons", "heads"], mask, k)
    ref_nad = torch.zeros(2, P, 4, 4, dtype=torch.float64)
    ref_neu = torch.zeros_like(ref_nad)
    for p in range(P):
        for h, n in mask[p].nonzero().tolist():
            ref_nad[:, p] += Z[:, n] * L[:, p, h] / k
            ref_neu[:, p] += Z[:, n] / k
    assert (out["nad"] - ref_nad).abs().max() < 1e-10
    assert (out["neurons"] - ref_neu).abs().max() < 1e-10
    assert (out["heads"] - L.mean(dim=2)).abs().max() < 1e-12
    # Z is the raw layer4 output with only the sink cell replaced
    f = contrib.features
    assert torch.equal(Z[..., :-1, :], f[..., :-1, :])
    assert torch.allclose(Z[..., -1, -1], (f[..., -1, -2] + f[..., -2, -1] + f[..., -2, -2]) / 3)


def test_maskclip_equals_1x1_convolutions(tiny, setup):
    text, _, contrib = setup
    pool = tiny.visual.attnpool
    with torch.no_grad():
        v = F.conv2d(contrib.features, pool.v_proj.weight[:, :, None, None], pool.v_proj.bias)
        o = F.conv2d(v, pool.c_proj.weight[:, :, None, None], pool.c_proj.bias)            # (B, D, h, w)
        ref = torch.einsum("bDij,pD->bpij", F.normalize(o, dim=1), F.normalize(text, dim=-1))
        out = S.crop_logits(contrib.spec, contrib.features, text, ["maskclip"])["maskclip"]
    assert (out - ref).abs().max() < 1e-12


def test_self_self_equals_scaled_dot_product_attention(tiny, setup):
    text, _, contrib = setup
    pool = tiny.visual.attnpool
    H = pool.num_heads
    with torch.no_grad():
        z = nha.decomposition.tokens(contrib.features, pool.positional_embedding)
        q, k, v = (m(z).unflatten(-1, (H, -1)).transpose(1, 2) for m in (pool.q_proj, pool.k_proj, pool.v_proj))
        o = F.scaled_dot_product_attention(q, q, v) + F.scaled_dot_product_attention(k, k, v)
        o = pool.c_proj(o.transpose(1, 2).flatten(2))[:, 1:]
        ref = torch.einsum("btD,pD->bpt", F.normalize(o, dim=-1), F.normalize(text, dim=-1)).view(2, P, 4, 4)
        out = S.crop_logits(contrib.spec, contrib.features, text, ["self-self"])["self-self"]
    assert (out - ref).abs().max() < 1e-12


def test_global_floor_is_the_zero_shot_cosine(tiny, setup):
    text, x, contrib = setup
    with torch.no_grad():
        out = S.crop_logits(contrib.spec, contrib.features, text, ["global"])["global"]
        ref = F.normalize(tiny.encode_image(x), dim=-1) @ F.normalize(text, dim=-1).T
    assert (out - ref[:, :, None, None]).abs().max() < 1e-12


def _uint8_image(h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def test_sliding_window_single_crop_and_overlap_average(tiny, setup):
    text = setup[0]
    seg = S.Segmentor(tiny, text, ["nad", "maskclip"], k=30, batch_size=2)
    assert (seg.crop_size, seg.stride, seg.short_side) == (128, 64, 128)
    square = _uint8_image(128, 128, 0)
    crop = seg.resize(square)[None]
    single = seg.crop_logits(crop)
    full = seg.logits([square])[0]
    for m in ("nad", "maskclip"):
        assert (full[m] - single[m][0]).abs().max() < 1e-12
    # 128 x 192: two windows (x = 0, 64); columns 64..127 average both
    wide = _uint8_image(128, 192, 1)
    big = seg.resize(wide)
    assert big.shape == (3, 128, 192)
    assert S.sliding_windows(128, 192, 128, 64) == [(0, 0), (0, 64)]
    left, right = seg.crop_logits(big[None, :, :, :128])["nad"][0], seg.crop_logits(big[None, :, :, 64:])["nad"][0]
    ref = torch.zeros(P, 128, 192, dtype=torch.float64)
    cnt = torch.zeros(128, 192, dtype=torch.float64)
    ref[:, :, :128] += left
    ref[:, :, 64:] += right
    cnt[:, :128] += 1
    cnt[:, 64:] += 1
    got = seg.logits([wide])[0]["nad"]
    assert (got - ref / cnt).abs().max() < 1e-12
    pred = seg.predict([wide])[0]["nad"]
    assert pred.shape == (128, 192)
    assert_argmax_agrees(ref / cnt, torch.as_tensor(pred), dim=0)
    # a non-square image: short side to the crop, predictions back at the original size
    small = _uint8_image(64, 80, 2)
    assert seg.predict([small])[0]["maskclip"].shape == (64, 80)
    assert S.sliding_windows(384, 500, 384, 192) == [(0, 0), (0, 116)]


def test_segmentor_rejects_bad_arguments(tiny, setup):
    text = setup[0]
    with pytest.raises(ValueError, match="unknown"):
        S.Segmentor(tiny, text, ["nope"])
    with pytest.raises(ValueError, match="multiple of 32"):
        S.Segmentor(tiny, text, ["maskclip"], crop_size=100)
    with pytest.raises(ValueError, match=r"\(P, D=64\)"):
        S.Segmentor(tiny, text[:, :5], ["maskclip"])
    with pytest.warns(UserWarning, match="positional embedding is interpolated"):
        seg = S.Segmentor(tiny, text, ["maskclip", "self-self", "nad"], crop_size=96, stride=32, k=10)
    out = seg.logits([_uint8_image(96, 128, 3)])[0]
    assert out["nad"].shape == (P, 96, 128) and torch.isfinite(out["self-self"]).all()


def test_confusion_matrix_against_hand_counts_and_sklearn():
    from sklearn.metrics import confusion_matrix, jaccard_score
    label = np.array([[0, 0, 1], [2, 2, 255]])
    pred = np.array([[0, 1, 1], [2, 0, 1]])
    cm = S.ConfusionMatrix(3)
    cm.update(pred, label)
    # hand counts: class 0: tp 1, fp 1 (pixel (1,1)), fn 1 -> IoU 1/3; class 1: tp 1, fp 1 -> 1/2; class 2: 1/2
    assert np.array_equal(cm.matrix, [[1, 1, 0], [0, 1, 0], [1, 0, 1]])
    s = cm.summary()
    assert s["iou"] == pytest.approx([1 / 3, 1 / 2, 1 / 2])
    assert s["miou"] == pytest.approx(4 / 9) and s["pixacc"] == pytest.approx(3 / 5)
    assert s["macc"] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)

    rng = np.random.default_rng(0)
    K = 6
    cm = S.ConfusionMatrix(K, no_background=True)
    labs, preds = [], []
    for _ in range(4):
        lab = rng.integers(0, K + 1, size=(20, 30))            # raw: 0 = background, 1..K classes
        lab[rng.random(lab.shape) < 0.05] = 255
        lab[lab == 4] = 0                                      # class 3 never present
        pr = rng.integers(0, K, size=lab.shape)
        pr[pr == 5] = 0                                        # class 5 never predicted
        cm.update(pr, lab)
        keep = (lab != 0) & (lab != 255)
        labs.append(lab[keep] - 1)
        preds.append(pr[keep])
    y, p = np.concatenate(labs), np.concatenate(preds)
    assert np.array_equal(cm.matrix, confusion_matrix(y, p, labels=list(range(K))))
    s = cm.summary()
    present = np.union1d(np.unique(y), np.unique(p))
    ious = jaccard_score(y, p, labels=present, average=None)
    assert s["miou"] == pytest.approx(ious.mean())
    assert s["pixacc"] == pytest.approx((y == p).mean())
    assert s["pixels"] == y.size
    assert S.miou_from_matrices(cm.matrix) == pytest.approx(s["miou"])
    with pytest.raises(ValueError, match="outside"):
        S.ConfusionMatrix(2).update(np.zeros((1, 1)), np.full((1, 1), 7))


def test_class_embeddings_average_then_centre(tiny):
    import open_clip
    from nha_plugin.readout import encode_texts
    tok = open_clip.tokenizer.SimpleTokenizer()
    names, templates = ["cat", "star", "grass"], ["a photo of a {}.", "{}"]
    raw = S.class_embeddings(tiny, tok, names, templates, centre=False, cache_dir=False)
    ref = torch.stack([F.normalize(encode_texts(tiny, tok, [t.format(n) for t in templates]).mean(0), dim=-1)
                       for n in names])
    assert (raw - ref.float()).abs().max() < 1e-5
    cen = S.class_embeddings(tiny, tok, {n: [t.format(n) for t in templates] for n in names}, cache_dir=False)
    ref_c = F.normalize(ref - ref.mean(0), dim=-1)
    assert (cen - ref_c.float()).abs().max() < 1e-5
    assert torch.allclose(cen.norm(dim=-1), torch.ones(3))
    with pytest.raises(ValueError, match="at least 2 classes"):
        S.centre_texts(ref[:1])


@pytest.mark.parametrize("background", ["classes", "ignore"])
def test_scene_labels_follow_the_exact_masks(background):
    from nha_plugin.scenes import SceneDataset
    ds = S.SceneSegmentation(3, seed=5, background=background)
    assert len(ds.class_names) == (16 if background == "classes" else 10)
    for i in range(3):
        image, label = ds[i]
        scene = SceneDataset(3, seed=5)[i]
        assert np.array_equal(np.asarray(image), scene.image)
        covered = np.zeros(label.shape, dtype=bool)
        for obj in scene.objects:
            want = ds.object_names.index(obj.name) + (1 if background == "ignore" else 0)
            assert (label[obj.mask] == want).all()
            covered |= obj.mask
        bg = 0 if background == "ignore" else ds.class_names.index(scene.background)
        assert (label[~covered] == bg).all()
    assert set(ds.prompts()) == set(ds.class_names)


@pytest.fixture(scope="module")
def scenes_rn():
    return nha.load_clip("scenes-rn")


def test_evaluate_scores_and_oracle(scenes_rn):
    model, preprocess, tok = scenes_rn
    ds = S.SceneSegmentation(4, seed=20_000)
    text = S.class_embeddings(model, tok, ds.prompts())
    seg = S.Segmentor(model, text, ["maskclip", "nad"], k=300, preprocess=preprocess)
    fresh = S.evaluate(seg, ds, progress=False, show=2, per_image=True)
    per = fresh["per_image"]["nad"]
    assert per.shape == (4, 16, 16) and per.sum() == 4 * 224 * 224
    assert S.miou_from_matrices(per.sum(0)) == pytest.approx(fresh["methods"]["nad"]["miou"])
    boot = S.bootstrap_miou(per, n_boot=5, seed=3)
    idx = np.random.default_rng(3).integers(0, 4, size=(5, 4))
    assert boot[2] == pytest.approx(S.miou_from_matrices(per[idx[2]].sum(0)))
    assert np.allclose(S.bootstrap_miou(np.repeat(per[:1], 4, axis=0), n_boot=5), S.miou_from_matrices(per[0]))
    # the oracle floor is the majority label everywhere
    cm = S.ConfusionMatrix(len(ds.class_names))
    for i in range(4):
        _, lab = ds[i]
        cm.update(np.full(lab.shape, np.bincount(lab.ravel()).argmax()), lab)
    assert np.allclose(fresh["methods"]["oracle-majority"]["miou"], cm.summary()["miou"])
    # maskclip's score equals scoring its own predictions
    cm = S.ConfusionMatrix(len(ds.class_names))
    for i in range(4):
        im, lab = ds[i]
        cm.update(seg.predict([im])[0]["maskclip"], lab)
    assert fresh["methods"]["maskclip"]["miou"] == pytest.approx(cm.summary()["miou"])
    assert len(fresh["examples"]) == 2


def test_segment_cli_writes_results(tmp_path, capsys):
    out = tmp_path / "seg"
    assert segment_main(["--n", "3", "--k", "200", "--out", str(out), "--quiet", "--show", "2"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["methods"]) == set(S.METHODS) | {"oracle-majority"}
    assert res["n"] == 3 and res["config"]["k"] == 200
    assert all(0 <= r["miou"] <= 1 and 0 <= r["pixacc"] <= 1 for r in res["methods"].values())
    assert res["methods"]["nad"]["pixels"] == 3 * 224 * 224
    assert (out / "predictions.png").stat().st_size > 1000
    assert "| nad |" in (out / "results.md").read_text()
    assert "mIoU" in capsys.readouterr().out
    assert segment_main(["--n", "2", "--method", "maskclip", "--scene-background", "ignore", "--out",
                         str(tmp_path / "b"), "--quiet", "--show", "0"]) == 0
    res = json.loads((tmp_path / "b" / "results.json").read_text())
    assert set(res["methods"]) == {"maskclip", "oracle-majority"} and res["no_background"]
    assert not (tmp_path / "b" / "predictions.png").exists()


def test_segment_cli_orients_pairs_with_dataset_pc0_signs(scenes_rn, tmp_path):
    from nha_plugin.cli import segment as segment_cli
    from nha_plugin.scenes import SceneDataset
    from nha_plugin.stats import collect
    from nha_plugin.zoo import images_to_tensor
    model = scenes_rn[0]
    x = images_to_tensor(np.stack([s.image for s in SceneDataset(6, seed=1)]))
    stats = collect(model, [x[:3], x[3:]], k=2, progress=False)
    path = stats.save(tmp_path / "stats.safetensors")
    signs = segment_cli.pair_signs(str(path), model)
    assert torch.equal(signs, stats.pc0_sign) and (signs == -1).any()
    spec = nha.adapters.get_spec(model)
    text = S.centre_texts(torch.randn(3, 128, generator=torch.Generator().manual_seed(0)))
    assert torch.allclose(S.pair_scores(spec, text, signs), S.pair_scores(spec, text) * signs)
    out = tmp_path / "o"
    assert segment_main(["--n", "2", "--method", "nad", "--k", "100", "--stats", str(path), "--out", str(out),
                         "--quiet", "--show", "0"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["stats"] == str(path)
    ds = S.SceneSegmentation(2, seed=20_000)
    seg = S.Segmentor(model, S.class_embeddings(model, scenes_rn[2], ds.prompts()), ["nad"], k=100, pair_signs=signs,
                      preprocess=scenes_rn[1])
    assert res["methods"]["nad"]["iou"] == S.evaluate(seg, ds, progress=False)["methods"]["nad"]["iou"]
    # the paper's preset: the same signs, the paper's maps
    out = tmp_path / "paper"
    assert segment_main(["--n", "2", "--method", "nad", "--k", "100", "--stats", str(path), "--preset", "paper",
                         "--out", str(out), "--quiet", "--show", "0"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert (res["config"]["preset"], res["config"]["bias_share"], res["config"]["sink_space"]) == \
        ("paper", "uniform", "contributions")
    seg = S.Segmentor(model, seg.text, ["nad"], k=100, pair_signs=signs, preprocess=scenes_rn[1], preset="paper")
    assert res["methods"]["nad"]["iou"] == S.evaluate(seg, ds, progress=False)["methods"]["nad"]["iou"]


def test_default_k_is_the_papers_share_of_pairs(tiny64):
    """20,000 of RN50x16's 48 x 3072 pairs; the tiny model (8 x 512) gets the same share, not 'every pair'."""
    from nha_plugin.adapters import get_spec
    from nha_plugin.applications.segmentation import Segmentor, paper_k
    spec = get_spec(tiny64)
    assert paper_k(spec) == round(20000 / (48 * 3072) * 8 * 512) == 556
    text = torch.nn.functional.normalize(torch.randn(3, spec.output_dim, dtype=torch.float64), dim=-1)
    seg = Segmentor(tiny64, text, methods=("nad",))
    assert seg.k == 556 and int(seg.mask[0].sum()) == 556
