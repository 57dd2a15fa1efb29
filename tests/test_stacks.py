"""Labelled stacks on Contributions (component axis first, TransformerLens style): exact sums, labels, selections,
and agreement with the dense pair table and with the level scores."""
import pytest
import torch

import nha_plugin as nha
from nha_plugin.adapters import get_spec

from conftest import images_for, scaled_tol

B, H, C, D = 3, 8, 512, 64


@pytest.fixture(scope="module")
def run(tiny64):
    x = images_for(tiny64, batch=B)
    with torch.no_grad():
        y = tiny64.encode_image(x)
    return x, y, {bias: nha.decompose(tiny64, x, bias=bias) for bias in ("own", "split")}


def _targets(seed=4):
    g = torch.Generator().manual_seed(seed)
    return {"single": torch.randn(D, generator=g, dtype=torch.float64),
            "set": torch.randn(D, 5, generator=g, dtype=torch.float64),
            "per_image": torch.randn(B, D, generator=g, dtype=torch.float64)}


def _score(y, target, kind):
    return (y * target).sum(-1) if kind == "per_image" else y @ target


def _constant(spec, bias):
    """What the stacks leave out of y: beta under bias='own' (their own term), nothing under 'split'. Built from the
    weights slice by slice, not through nha_plugin.pool."""
    if bias == "split":
        return torch.zeros(D, dtype=torch.float64)
    return spec.c_bias + spec.c_weight @ spec.v_bias


@pytest.mark.parametrize("bias", ["own", "split"])
def test_vector_stacks_sum_to_the_embedding(tiny64, run, bias):
    _, y, contribs = run
    contrib = contribs[bias]
    rest = _constant(get_spec(tiny64).detached(), bias)
    tol = scaled_tol(y, 1e-12)
    heads, hlabels = contrib.stack_head_contributions(return_labels=True)
    neurons, nlabels = contrib.stack_neuron_contributions(return_labels=True)
    pairs, plabels = contrib.stack_pair_contributions(return_labels=True)
    assert heads.shape == (H, B, D) and neurons.shape == (C, B, D) and pairs.shape == (H * C, B, D)
    for stack in (heads, neurons, pairs):
        torch.testing.assert_close(stack.sum(0) + rest, y, rtol=0, atol=tol)
    assert hlabels == [f"H{h}" for h in range(H)] and nlabels[17] == "N17" and len(nlabels) == C
    assert plabels[3 * C + 17] == "H3N17" and len(plabels) == H * C


@pytest.mark.parametrize("bias", ["own", "split"])
@pytest.mark.parametrize("kind", ["single", "set", "per_image"])
def test_scored_stacks_sum_to_the_target_score(run, bias, kind):
    _, y, contribs = run
    contrib, target = contribs[bias], _targets()[kind]
    expected = _score(y, target, kind) - contrib.bias_score(target)
    shape = (B, 5) if kind == "set" else (B,)
    for name, size in (("head", H), ("neuron", C), ("pair", H * C)):
        stack = getattr(contrib, f"stack_{name}_contributions")(target)
        assert stack.shape == (size, *shape)
        torch.testing.assert_close(stack.sum(0), expected, rtol=0, atol=scaled_tol(expected, 1e-11))


@pytest.mark.parametrize("bias", ["own", "split"])
def test_scored_stacks_are_the_vector_stacks_projected(run, bias):
    contrib = run[2][bias]
    e = _targets()["set"]
    for name, kwargs in (("head", {}), ("neuron", dict(neurons=[5, 17, 300])),
                         ("pair", dict(heads=[1, 6], neurons=[0, 17, 511]))):
        method = getattr(contrib, f"stack_{name}_contributions")
        vectors, labels = method(return_labels=True, **kwargs)
        scored, scored_labels = method(e, return_labels=True, **kwargs)
        assert labels == scored_labels
        torch.testing.assert_close(scored, vectors @ e, rtol=0, atol=scaled_tol(scored, 1e-12))


def test_selected_pairs_are_the_dense_table(run):
    contrib = run[2]["own"]
    dense = contrib.pair_contributions()                                   # (B, H, C, D)
    every = contrib.stack_pair_contributions()                             # (H*C, B, D), head-major
    torch.testing.assert_close(every, dense.permute(1, 2, 0, 3).flatten(0, 1), rtol=0, atol=scaled_tol(dense, 1e-12))
    pairs, labels = contrib.stack_pair_contributions(heads=[3, 0], neurons=torch.tensor([17, 18]),
                                                      return_labels=True)
    assert labels == ["H3N17", "H3N18", "H0N17", "H0N18"]
    expected = torch.stack([dense[:, 3, 17], dense[:, 3, 18], dense[:, 0, 17], dense[:, 0, 18]])
    torch.testing.assert_close(pairs, expected, rtol=0, atol=scaled_tol(dense, 1e-12))
    neurons, nlabels = contrib.stack_neuron_contributions(neurons=[17, 2], return_labels=True)
    assert nlabels == ["N17", "N2"]
    torch.testing.assert_close(neurons, dense.sum(1)[:, [17, 2]].movedim(1, 0), rtol=0, atol=scaled_tol(dense, 1e-11))


def test_split_stacks_carry_the_paper_bias_shares(tiny64, run):
    """Under bias='split' head h gets W_o^h b_v^h + b_o / H and each of its pairs a C-th of that."""
    own, split = run[2]["own"], run[2]["split"]
    spec = get_spec(tiny64).detached()
    d = spec.head_dim
    share = torch.stack([spec.c_weight[:, i * d:(i + 1) * d] @ spec.v_bias[i * d:(i + 1) * d] for i in range(H)])
    share = share + spec.c_bias / H                                                      # (H, D)
    tol = scaled_tol(share, 1e-12)
    torch.testing.assert_close(split.stack_head_contributions() - own.stack_head_contributions(),
                               share[:, None].expand(H, B, D), rtol=0, atol=tol)
    diff = split.stack_pair_contributions(heads=[2]) - own.stack_pair_contributions(heads=[2])
    torch.testing.assert_close(diff, (share[2] / C).expand(C, B, D), rtol=0, atol=tol)


def test_selection_errors_say_the_range(run):
    contrib = run[2]["own"]
    with pytest.raises(ValueError, match=r"0\.\.511.*\[512\]"):
        contrib.stack_neuron_contributions(neurons=[3, 512])
    with pytest.raises(ValueError, match=r"heads must be indices in 0\.\.7"):
        contrib.stack_pair_contributions(heads=[-1])
