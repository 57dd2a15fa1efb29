"""Shared fixtures: small random CLIP-ResNets with meaningful BatchNorm, built offline."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if "NHA_CACHE_DIR" not in os.environ:  # keep the tests' text-embedding cache out of the user's home
    import tempfile
    os.environ["NHA_CACHE_DIR"] = tempfile.mkdtemp(prefix="nha-test-cache-")

import open_clip
import pytest
import torch
from torch import nn

TINY_CFG = dict(
    embed_dim=64,
    vision_cfg=dict(layers=[1, 1, 1, 1], width=16, head_width=64, image_size=128),   # C=512, H=8, 4x4 grid
    text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=1, layers=1),
)


def rerandomise_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """open_clip zero-initialises every bn3.weight, silencing residual branches; give BN real statistics."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 0.8 + 0.4)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 0.5 + 0.75)
    return model


def randomise_pool_biases(model: nn.Module, seed: int = 1) -> nn.Module:
    """open_clip initialises attention-pool biases to zero; non-zero biases exercise the constant terms."""
    g = torch.Generator().manual_seed(seed)
    pool = getattr(model, "visual", model).attnpool
    with torch.no_grad():
        for lin in (pool.q_proj, pool.k_proj, pool.v_proj, pool.c_proj):
            lin.bias.copy_(torch.randn(lin.bias.shape, generator=g) * 0.1)
    return model


def make_tiny(dtype=torch.float64, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(**TINY_CFG)
    return randomise_pool_biases(rerandomise_batchnorm(model, seed), seed + 1).eval().to(dtype)


@pytest.fixture(scope="session")
def tiny64():
    return make_tiny(torch.float64)


@pytest.fixture(scope="session")
def tiny32():
    return make_tiny(torch.float32)


@pytest.fixture(scope="session")
def rn50_64():
    torch.manual_seed(0)
    model = open_clip.create_model("RN50")
    return randomise_pool_biases(rerandomise_batchnorm(model)).eval().double()


def images_for(model_or_size, batch=2, dtype=torch.float64, seed=0):
    size = model_or_size if isinstance(model_or_size, int) else model_or_size.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=g).to(dtype)


@pytest.fixture(scope="session")
def timm_rn50(rn50_64):
    """timm's resnet50_clip holding the same weights as ``rn50_64`` (converted by timm's own filter)."""
    timm = pytest.importorskip("timm")
    from timm.models.byobnet import checkpoint_filter_fn
    model = timm.create_model("resnet50_clip", pretrained=False, num_classes=1024)
    model.load_state_dict(checkpoint_filter_fn(rn50_64.state_dict(), model))
    return model.eval().double()


TINY_VIT_CFG = dict(
    embed_dim=32,
    vision_cfg=dict(layers=3, width=64, head_width=16, patch_size=16, image_size=64),   # 4 heads, 4x4 grid + cls
    text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=1, layers=1),
)


def randomise_vit(model: nn.Module, seed: int = 1) -> nn.Module:
    """open_clip initialises LayerNorm to (1, 0) and attention biases to zero; random values exercise every
    term of a ViT decomposition (LN gains, shifts, q/k/v/out biases, MLP biases)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in getattr(model, "visual", model).named_parameters():
            if p.ndim == 1 and ("ln" in name or "norm" in name) and name.endswith("weight"):
                p.copy_(torch.rand(p.shape, generator=g) * 0.8 + 0.6)
            elif p.ndim == 1 and name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def make_tiny_vit(dtype=torch.float64, seed: int = 0, block_type: str = "default") -> nn.Module:
    """A tiny random open_clip CLIP-ViT: width 64, 3 layers, 4 heads of 16, 64 px, patch 16 (17 tokens).
    ``block_type="custom"`` builds open_clip's own ``Attention`` module instead of nn.MultiheadAttention."""
    torch.manual_seed(seed)
    cfg = dict(TINY_VIT_CFG, vision_cfg=dict(TINY_VIT_CFG["vision_cfg"], block_type=block_type))
    model = open_clip.model.CLIP(**cfg)
    return randomise_vit(model, seed + 1).eval().to(dtype)


@pytest.fixture(scope="session")
def tiny_vit64():
    return make_tiny_vit(torch.float64)


@pytest.fixture(scope="session")
def tiny_vit64_custom():
    return make_tiny_vit(torch.float64, block_type="custom")


def assert_plain_prompts_pick_the_planted_object(model, tokenizer, seed: int) -> None:
    """Plain prompts ("a yellow object", "a photo of a cat") rank one-object scenes of a yellow star and of a cat
    the right way round: ground truth from the generated scenes, for a bundled scenes model."""
    import numpy as np
    import torch.nn.functional as F

    from nha_plugin import scenes as S
    from nha_plugin.zoo.bundled import images_to_tensor

    scenes = [S.generate_scene((seed + 7, i), objects=[{"colour": "yellow", "shape": "star"}], n_objects=1)
              for i in range(4)]
    scenes += [S.generate_scene((seed + 8, i), objects=[{"category": "cat"}], n_objects=1) for i in range(4)]
    with torch.no_grad():
        img = F.normalize(model.encode_image(images_to_tensor(np.stack([s.image for s in scenes]))), dim=-1)
        txt = F.normalize(model.encode_text(tokenizer(["a yellow object", "a photo of a cat"])), dim=-1)
    sims = img @ txt.T
    assert (sims[:4, 0] > sims[:4, 1]).all() and (sims[4:, 1] > sims[4:, 0]).all()


def assert_checkpoints_equal(resumed_path, straight_path, step: int) -> None:
    """A training run interrupted and resumed ends where an uninterrupted one does: same step, bit-identical
    weights, optimizer state and torch RNG state, same evaluations (checkpoints read with
    ``files.load_state``: nothing is unpickled)."""
    from nha_plugin.files import load_state

    resumed, straight = load_state(resumed_path), load_state(straight_path)
    assert resumed["step"] == straight["step"] == step
    assert resumed["model"].keys() == straight["model"].keys()
    for k, v in straight["model"].items():
        assert torch.equal(resumed["model"][k], v), k
    opt_r, opt_s = resumed["optimizer"], straight["optimizer"]
    assert opt_r["param_groups"] == opt_s["param_groups"] and opt_r["state"].keys() == opt_s["state"].keys()
    for i, slots in opt_s["state"].items():
        assert slots.keys() == opt_r["state"][i].keys()
        for name, v in slots.items():
            assert torch.equal(opt_r["state"][i][name], v), (i, name)
    assert torch.equal(resumed["rng"]["torch"], straight["rng"]["torch"])
    assert resumed["history"] == straight["history"] and resumed["best"] == straight["best"]


def assert_target_forms_agree(nad, x) -> None:
    """Captum target forms (list, (B,) tensor, 0-d tensor) give what one image at a time gives; ``nad`` is an
    attribution over a read-out with at least 4 outputs and ``x`` a batch of 3 images."""
    per = torch.stack([nad.attribute(x[i:i + 1], target=t)[0] for i, t in enumerate([0, 3, 1])])
    assert torch.allclose(nad.attribute(x, target=[0, 3, 1]), per, atol=1e-12)
    assert torch.allclose(nad.attribute(x, target=torch.tensor([0, 3, 1])), per, atol=1e-12)
    assert torch.allclose(nad.attribute(x, target=torch.tensor(3))[1], per[1], atol=1e-12)


def assert_noise_tunnel_keeps_exact_deltas(nad, x, shape) -> None:
    """Captum's NoiseTunnel (smoothgrad, 3 samples) over ``nad`` on a batch of 3: maps of ``shape`` and exact
    convergence deltas for each of the 9 noisy images."""
    from captum.attr import NoiseTunnel

    nt = NoiseTunnel(nad)
    attr, delta = nt.attribute(x, nt_type="smoothgrad", nt_samples=3, stdevs=0.05, target=1,
                               return_convergence_delta=True)
    assert attr.shape == shape
    assert delta.shape == (9,) and delta.abs().max() < 1e-9


def scaled_tol(reference, rel: float = 1e-12) -> float:
    """An absolute tolerance scaled to the magnitude of ``reference``: results computed in another batch
    split or thread count round differently in the last bits, so exact equality is not a property."""
    ref = torch.as_tensor(reference).detach()
    ref = ref[ref.isfinite()] if ref.is_floating_point() else ref
    return rel * max(float(ref.abs().max()) if ref.numel() else 0.0, 1e-300)


def assert_topk_selection(values, indices, *, dim: int = -1, largest: bool = True, rel: float = 1e-12) -> None:
    """``indices`` (k per row along ``dim``) pick the k largest (``largest``) or smallest entries of ``values``,
    in order, up to swaps among entries equal within a tolerance scaled to their magnitude.

    The values at the picked indices must equal the reference's sorted top-k values; so a different index is
    accepted only where it points at a value indistinguishable from the one it replaces (a near-tie)."""
    values, indices = torch.as_tensor(values), torch.as_tensor(indices)
    k = indices.shape[dim]
    picked = values.gather(dim, indices)
    ref = values.sort(dim=dim, descending=largest).values.narrow(dim, 0, k)
    torch.testing.assert_close(picked, ref, rtol=0, atol=scaled_tol(values, rel))
    srt = indices.sort(dim=dim).values
    assert not (srt.narrow(dim, 1, k - 1) == srt.narrow(dim, 0, k - 1)).any(), "an index is picked twice"


def assert_argmax_agrees(scores, predicted, *, dim: int = 0, rel: float = 1e-9, atol: float = 0.0) -> None:
    """``predicted`` holds, along ``dim`` of ``scores``, an index whose score equals the maximum within
    ``atol`` plus a tolerance scaled to the scores' magnitude (the argmax up to near-ties)."""
    scores, predicted = torch.as_tensor(scores), torch.as_tensor(predicted).long()
    best = scores.max(dim=dim).values
    got = scores.gather(dim, predicted.unsqueeze(dim)).squeeze(dim)
    gap = float((best - got).abs().max())
    assert gap <= atol + scaled_tol(scores, rel), f"a prediction is not the argmax (score gap {gap:.3g})"


def assert_greedy_picks_agree(a, b, *, rtol: float = 1e-10) -> None:
    """Two TextSpan results (``indices``, ``variances``) pick the same texts, unless a step had two texts tied
    within rounding: there the variance picked agrees, and later picks are free to diverge."""
    n = len(a.indices)
    if not torch.equal(a.indices, b.indices):
        n = int((a.indices != b.indices).nonzero()[0]) + 1
    torch.testing.assert_close(a.variances[:n], b.variances[:n], rtol=rtol, atol=scaled_tol(b.variances, rtol))


def planted(marker):
    """An object whose unpickling creates the file ``marker``: stands for any code a planted pickle could run.
    ``pickle.dumps`` / ``torch.save`` it (inside any container) to plant a malicious file."""
    class Planted:
        def __reduce__(self):
            return open, (str(marker), "w")

    return Planted()


def assert_user_error(capsys, text: str, main, argv) -> str:
    """``main(argv)`` (a CLI entry point) ends with exit status 2 and a message on stderr containing ``text``,
    without a traceback; returns the stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and text in err and "Traceback" not in err, err
    return err


def write_malicious_pickle(path, marker) -> bytes:
    """Write at ``path`` a pickle whose unpickling creates the file ``marker`` (its ``__reduce__`` calls
    ``open(marker, "w")``), as an attacker planting a checkpoint would; returns its bytes."""
    import pickle
    from pathlib import Path

    data = pickle.dumps(planted(marker))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(data)
    return data


def assert_pickle_would_run(data: bytes, marker) -> None:
    """The planted bytes really execute code when unpickled (so a test that never sees ``marker`` means the
    package never unpickled them); the marker is removed again."""
    import pickle
    from pathlib import Path

    pickle.loads(data).close()
    assert Path(marker).exists()
    Path(marker).unlink()


def make_sink_model(dtype=torch.float64, seed: int = 0, strength: float = 6.0) -> nn.Module:
    """The tiny random CLIP-ResNet with an attention sink built in, as trained CLIP-ResNets have: the class
    token's query gets a component r_h per head and the last spatial token's positional embedding a component
    that the keys map onto r_h, so every head puts most of its class attention on the last spatial token
    whatever the image (scenes-rn has no sink, so sink handling needs this fixture to mean anything)."""
    model = make_tiny(torch.float64, seed)
    pool = model.visual.attnpool
    H, C = pool.num_heads, pool.q_proj.weight.shape[0]
    g = torch.Generator().manual_seed(seed + 11)
    r = torch.nn.functional.normalize(torch.randn(H, C // H, generator=g, dtype=torch.float64), dim=1).reshape(C)
    with torch.no_grad():
        pool.q_proj.bias += strength * r
        pool.positional_embedding[-1] += strength * torch.linalg.solve(pool.k_proj.weight, r)
    return model.to(dtype)


# ---- skips are failures in CI --------------------------------------------------------------------------------
# `make test` installs every extra, so a skipped test there means a check silently did not run. With
# NHA_STRICT_SKIPS=1 (set by `make test`) a skip fails the run unless its test is listed here with the reason.
ALLOWED_SKIPS: dict = {
    # "tests/test_x.py::test_y": "why this skip is legitimate on the CI machine",
}


def _strict_skips() -> bool:
    return os.environ.get("NHA_STRICT_SKIPS") == "1"


def _fail_skip(report, where: str) -> None:
    report.outcome = "failed"
    report.longrepr = (f"{where} was skipped ({report.longrepr}) but NHA_STRICT_SKIPS=1: `make test` installs "
                       "every extra, so this check must run. Fix the cause, or add the test to ALLOWED_SKIPS in "
                       "tests/conftest.py with the reason it is legitimate.")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and _strict_skips() and item.nodeid.split("[")[0] not in ALLOWED_SKIPS:
        _fail_skip(report, item.nodeid)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and _strict_skips() and report.nodeid not in ALLOWED_SKIPS:
        _fail_skip(report, report.nodeid)


# ---- the tiny CLIP-ViT in transformers and timm ----------------------------------------------------------------
TINY_TIMM_ARGS = dict(embed_dim=64, depth=3, num_heads=4, patch_size=16, img_size=64, num_classes=32)  # TINY_VIT's tower


def _hf_vision_tower(model):
    tower = getattr(model, "vision_model", model)
    return getattr(tower, "vision_model", tower)            # transformers 4.x nests one level deeper


def tiny_vit_as_transformers(model: nn.Module, kind: str = "CLIPModel", hidden_act: str = "gelu") -> nn.Module:
    """The tiny open_clip CLIP-ViT's image tower rebuilt in transformers' ``kind`` (``CLIPModel``,
    ``CLIPVisionModelWithProjection`` or ``CLIPVisionModel``) holding the same weights (a CLIPModel's text tower
    is a random 1-layer one), in float64 and eval mode. The mapping is written out here, independently of the
    package: q/k/v are the thirds of in_proj, the projection is proj transposed."""
    transformers = pytest.importorskip("transformers")
    v = model.visual
    blocks = v.transformer.resblocks
    W = v.class_embedding.shape[0]
    vision = dict(hidden_size=W, intermediate_size=blocks[0].mlp.c_fc.weight.shape[0], num_hidden_layers=len(blocks),
                  num_attention_heads=blocks[0].attn.num_heads, image_size=v.image_size[0], patch_size=v.patch_size[0],
                  hidden_act=hidden_act, layer_norm_eps=v.ln_post.eps, projection_dim=v.proj.shape[1])
    torch.manual_seed(0)
    if kind == "CLIPModel":
        text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
        hf = transformers.CLIPModel(transformers.CLIPConfig(vision_config=vision, text_config=text,
                                                            projection_dim=v.proj.shape[1]))
    else:
        hf = getattr(transformers, kind)(transformers.CLIPVisionConfig(**vision))
    hf = hf.double().eval()
    sd = {"embeddings.class_embedding": v.class_embedding, "embeddings.patch_embedding.weight": v.conv1.weight,
          "embeddings.position_embedding.weight": v.positional_embedding}
    for ours, theirs in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
        sd.update({f"{theirs}.weight": getattr(v, ours).weight, f"{theirs}.bias": getattr(v, ours).bias})
    for i, blk in enumerate(blocks):
        p = f"encoder.layers.{i}."
        for name, w, b in zip("qkv", blk.attn.in_proj_weight.chunk(3), blk.attn.in_proj_bias.chunk(3)):
            sd.update({f"{p}self_attn.{name}_proj.weight": w, f"{p}self_attn.{name}_proj.bias": b})
        for ours, theirs in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                             ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
            module = blk.get_submodule(ours)
            sd.update({f"{p}{theirs}.weight": module.weight, f"{p}{theirs}.bias": module.bias})
    missing, unexpected = _hf_vision_tower(hf).load_state_dict(sd, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
    if hasattr(hf, "visual_projection"):
        with torch.no_grad():
            hf.visual_projection.weight.copy_(v.proj.T)
    return hf


def tiny_vit_as_timm(model: nn.Module) -> nn.Module:
    """The tiny open_clip CLIP-ViT's image tower as timm's ``vit_base_patch32_clip_224`` at the tiny size, its
    weights converted by timm's own OpenAI-CLIP checkpoint filter (float64, eval mode)."""
    timm = pytest.importorskip("timm")
    from timm.models.vision_transformer import checkpoint_filter_fn
    out = timm.create_model("vit_base_patch32_clip_224", pretrained=False, **TINY_TIMM_ARGS).double()
    out.load_state_dict(checkpoint_filter_fn(model.state_dict(), out))
    return out.eval()


def make_tiny_timm(dtype=torch.float64, seed: int = 0, **options) -> nn.Module:
    """A tiny random timm CLIP-ViT (TINY_TIMM_ARGS, then ``options``: timm VisionTransformer arguments) with random
    LayerNorm gains, biases (the head's included) and layer-scale gains, in eval mode."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(seed)
    model = timm.create_model("vit_base_patch32_clip_224", pretrained=False, **{**TINY_TIMM_ARGS, **options})
    randomise_vit(model, seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    return model.eval().to(dtype)


def make_bias_free(model: nn.Module) -> nn.Module:
    """A copy of a CLIP-ResNet with no BatchNorm shifts, attention-pool biases or positional embedding: nothing
    can absorb LRP relevance, so a conserving propagation must keep the logit."""
    import copy                                  # here: helpers are only appended to this file
    m = copy.deepcopy(model)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.bias.zero_()
                mod.running_mean.zero_()
        pool = m.visual.attnpool
        pool.positional_embedding.zero_()
        for lin in (pool.q_proj, pool.k_proj, pool.v_proj, pool.c_proj):
            lin.bias.zero_()
    return m


def tiny_report_inputs():
    """What the report tests share, computed once per session: a tiny scenes-rn benchmark run (2 generated
    scenes; nad_spatial, random, centre; the metrics that rerun nothing) and the atlas of scenes-rn
    over 6 generated scenes (3 words, 2 top images per unit).

    Returns:
        ``{"run": run folder, "atlas": atlas dict, "x": (6, 3, 224, 224) images, "thumbs": 6 (112, 112, 3) uint8,
        "model", "tokenizer"}``.
    """
    if not hasattr(tiny_report_inputs, "value"):
        import tempfile
        from pathlib import Path

        from nha_plugin.harness import BenchmarkConfig, run_benchmark
        from nha_plugin.models import load_clip
        from nha_plugin.report.atlas import resnet_atlas
        from nha_plugin.report.build import scene_images
        folder = Path(tempfile.mkdtemp(prefix="nha_report_run_"))
        run_benchmark(BenchmarkConfig(model="scenes-rn", dataset="scenes", n=2, n_subset=0, n_grid=2, quiet=True,
                                      methods=("nad_spatial", "random", "centre"), out=str(folder),
                                      metrics=("pointing_game", "mass_in_mask", "segmentation",
                                               "completeness_error", "seconds_per_image")))
        model, _, tokenizer = load_clip("scenes-rn")
        x, thumbs = scene_images(6, 123)
        atlas = resnet_atlas(model, tokenizer, x, pool="scenes", k=3, top=2, progress=False)
        tiny_report_inputs.value = {"run": folder, "atlas": atlas, "x": x, "thumbs": thumbs, "model": model,
                                    "tokenizer": tokenizer}
    return tiny_report_inputs.value


def assert_refused(capsys, text: str, main, argv) -> str:
    """``main(argv)`` (a CLI entry point) refuses a file or run met while working: it returns 2 after one line on
    stderr containing ``text``, without a traceback (``nha_plugin.cli.common.dispatch``); returns the stderr."""
    capsys.readouterr()
    status = main(argv)
    err = capsys.readouterr().err
    assert status == 2 and text in err and "Traceback" not in err, (status, err)
    assert len(err.strip().splitlines()) == 1, err
    return err


def load_benchmark(name: str):
    """The script benchmarks/<name>.py as a module (the benchmarks are scripts, not a package)."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def layer4_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer4 output F (B, C, h, w) of an open_clip CLIP-ResNet, run module by module (not through an adapter)."""
    v = model.visual
    return v.layer4(v.layer3(v.layer2(v.layer1(v.stem(x)))))


def pool_tokens_and_attention(pool: nn.Module, features: torch.Tensor):
    """Tokens z (B, T, C) of an open_clip attention pool and its class token's attention (B, H, T), the attention
    from torch's own multi-head attention."""
    flat = features.flatten(2).transpose(1, 2)                                       # (B, hw, C)
    z = torch.cat([flat.mean(1, keepdim=True), flat], 1) + pool.positional_embedding
    zt = z.transpose(0, 1)
    _, w = nn.functional.multi_head_attention_forward(
        zt, zt, zt, zt.shape[-1], pool.num_heads, None,
        torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]), None, None, False, 0.0,
        pool.c_proj.weight, pool.c_proj.bias, training=False, need_weights=True, use_separate_proj_weight=True,
        q_proj_weight=pool.q_proj.weight, k_proj_weight=pool.k_proj.weight, v_proj_weight=pool.v_proj.weight,
        average_attn_weights=False)
    return z, w[:, :, 0]


def dense_pair_directions(pool: nn.Module) -> torch.Tensor:
    """u[h, n] = W_o^h W_v^h[:, n] of an open_clip attention pool, one head at a time: (H, C, D)."""
    H, C = pool.num_heads, pool.v_proj.in_features
    d = C // H
    return torch.stack([pool.c_proj.weight[:, h * d:(h + 1) * d] @ pool.v_proj.weight[h * d:(h + 1) * d]
                        for h in range(H)]).transpose(1, 2)


def paper_pcs_dense(pool: nn.Module, features: torch.Tensor, top: int):
    """PC0 of every pair as the NAD paper's code fits it: each pair's contributions over the images, centred, the
    ``top`` largest by norm, first right singular vector, flipped unless more than top // 2 project positively.

    Args:
        pool: an open_clip attention pool; features: layer4 outputs (N, C, h, w) of the dataset.

    Returns:
        (H, C, D) PC0 directions (a numpy SVD per pair).
    """
    import numpy as np
    z, a = pool_tokens_and_attention(pool, features)
    s = torch.einsum("bht,btn->bhn", a, z)                                           # pair coefficients
    contrib = (s[..., None] * dense_pair_directions(pool)).numpy()                   # constants cancel in the centring
    cur = contrib - contrib.mean(0)
    order = np.argsort(np.linalg.norm(cur, axis=-1), axis=0)[-top:]                  # (top, H, C)
    picked = np.take_along_axis(cur, order[..., None], axis=0).transpose(1, 2, 0, 3)  # (H, C, top, D)
    vh = np.linalg.svd(picked, full_matrices=False)[2][:, :, 0]                      # one SVD per pair, (H, C, D)
    positive = (np.einsum("hnkD,hnD->hnk", picked, vh) > 0).sum(-1)
    return torch.from_numpy(np.where((positive > top // 2)[..., None], vh, -vh))


def _interpolate_last_token(x: torch.Tensor, w: int) -> torch.Tensor:
    """x (B, T, ...) with the last token replaced by the mean of tokens W, N, NW (grid width w)."""
    x = x.clone()
    x[:, -1] = (x[:, -2] + x[:, -1 - w] + x[:, -2 - w]) / 3
    return x


def paper_crop_logits_dense(pool: nn.Module, features: torch.Tensor, text: torch.Tensor, pcs: torch.Tensor, k: int):
    """The NAD paper's crop logits, one token, head and pair at a time: contributions
    a[h,m] W_o^h (W_v^h z_m + b_v^h) + b_o / (T H), the sink token's vectors interpolated, cosine with t_p; neuron
    maps the raw layer4 activations with the sink interpolated; logit = (1/k) sum over the top-k pairs by <PC0, t>.

    Args:
        pool: an open_clip attention pool; features: layer4 outputs (B, C, h, w) of the crops (float64).
        text: (P, D) class directions; pcs: (H, C, D) from :func:`paper_pcs_dense`; k: pairs per class.

    Returns:
        (B, P, h, w) logits.
    """
    H, C = pool.num_heads, pool.v_proj.in_features
    d = C // H
    z, a = pool_tokens_and_attention(pool, features)
    B, T = z.shape[:2]
    P = text.shape[0]
    gh, gw = features.shape[-2:]
    v = pool.v_proj(z)
    contrib = torch.zeros(B, T, H, pool.c_proj.out_features, dtype=torch.float64)
    for m in range(T):
        for h in range(H):
            wo = pool.c_proj.weight[:, h * d:(h + 1) * d]
            contrib[:, m, h] = (a[:, h, m, None] * v[:, m, h * d:(h + 1) * d]) @ wo.T + pool.c_proj.bias / (T * H)
    contrib = _interpolate_last_token(contrib, gw)
    sim = torch.einsum("bmhD,pD->bpmh", nn.functional.normalize(contrib, dim=-1), text)   # (B, P, T, H)
    cells = torch.cat([torch.zeros(B, 1, C, dtype=features.dtype), features.flatten(2).transpose(1, 2)], 1)
    conv = _interpolate_last_token(cells, gw)
    out = torch.zeros(B, P, T, dtype=torch.float64)
    for p in range(P):
        for idx in (pcs.reshape(H * C, -1) @ text[p]).topk(k).indices.tolist():
            h, n = divmod(idx, C)
            out[:, p] += conv[:, :, n] * sim[:, p, :, h] / k
    return out[:, :, 1:].reshape(B, P, gh, gw)


def run_processes(worker, args: tuple, nprocs: int = 2, timeout: float = 240) -> None:
    """Run ``worker(rank, *args)`` in ``nprocs`` spawned processes (a torchrun stand-in for gloo tests); fail the
    test, killing them, when they do not all finish within ``timeout`` seconds (a rank error is re-raised)."""
    import time

    import torch.multiprocessing as mp
    ctx = mp.start_processes(worker, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.time() + timeout
    while not ctx.join(timeout=5):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the {nprocs}-process run did not finish in {timeout:.0f} s")
