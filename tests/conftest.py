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

    class Planted:
        def __reduce__(self):
            return open, (str(marker), "w")
    data = pickle.dumps(Planted())
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


def load_benchmark(name: str):
    """The script benchmarks/<name>.py as a module (the benchmarks are scripts, not a package)."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
