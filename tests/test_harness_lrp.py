"""zennit LRP on CLIP-ResNet: canonizers keep the function, conserve relevance where LRP can, and the attention
pool's AH rule reproduces the exact NAD spatial decomposition when attention is held constant."""
import copy

import numpy as np

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("zennit")

import nha_plugin as nha
from nha_plugin.adapters import zennit as Z
from nha_plugin.readout import LinearReadout
from zennit.attribution import Gradient
from zennit.composites import COMPOSITES
from zennit.core import Composite

from conftest import images_for, make_bias_free


def _head(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    return LinearReadout(model, F.normalize(torch.randn(64, 5, generator=g, dtype=torch.float64), dim=0),
                         logit_scale=100.0)


def test_composites_registered_and_constructible_without_arguments():
    for name, cls in (("clip_resnet_epsilon_gamma_box", Z.CLIPResNetEpsilonGammaBox),
                      ("clip_resnet_epsilon_plus", Z.CLIPResNetEpsilonPlus)):
        assert COMPOSITES[name] is cls
        cls()
    Z.CLIPResNetCanonizer()
    Z.AttentionPoolCanonizer()
    Z.CLIPBottleneckCanonizer()
    Z.CLIPBatchNormCanonizer()


def test_canonized_model_computes_the_same_function_and_is_restored(tiny64):
    head = Z.lrp_readout(_head(tiny64))
    x = images_for(tiny64, batch=2)
    before = head(x)
    assert torch.allclose(before, _head(tiny64)(x), atol=1e-12)
    block = tiny64.visual.layer2[0]
    with Composite(canonizers=[Z.CLIPResNetCanonizer()]).context(head) as modified:
        assert hasattr(block, "canonizer_sum")
        assert torch.allclose(modified(x), before, atol=1e-10)
    assert not hasattr(block, "canonizer_sum") and "forward" not in block.__dict__
    assert torch.equal(head(x), before)


@pytest.mark.parametrize("composite", [Z.CLIPResNetEpsilonGammaBox, Z.CLIPResNetEpsilonPlus])
def test_conservation_without_biases(tiny64, composite):
    """Biases (merged BatchNorm shifts, pool biases, positional embedding) absorb relevance by design; without
    them the canonized propagation must conserve the logit (the plain gradient with ``out += identity`` doubles
    relevance at every residual; a Pass'd attention softmax leaks it)."""
    head = _head(make_bias_free(tiny64))
    x = images_for(tiny64, batch=2)
    t = torch.tensor([1, 4])
    relevance, logits = Z.lrp_attribute(head, x, t, composite())
    assert relevance.shape == x.shape
    assert Z.conservation_error(relevance, logits, t).max() < 0.03


def test_conservation_is_reported_with_biases(tiny64):
    head = _head(tiny64)
    x = images_for(tiny64, batch=1)
    relevance, logits = Z.lrp_attribute(head, x, 2)
    err = Z.conservation_error(relevance, logits, torch.tensor([2]))
    assert torch.isfinite(err).all() and err.item() > 0.01        # a real model leaks: the harness reports it


def test_attention_pool_ah_rule_equals_nad_spatial_map(tiny64):
    """With attention constant the pool is linear in layer4, so LRP-epsilon (no pool biases) gives exactly the
    NAD spatial contributions: the positional share goes to the Sum, the mean token spreads 1/hw per cell."""
    m = copy.deepcopy(tiny64)
    with torch.no_grad():
        for lin in (m.visual.attnpool.q_proj, m.visual.attnpool.k_proj, m.visual.attnpool.v_proj,
                    m.visual.attnpool.c_proj):
            lin.bias.zero_()
    head = _head(m)
    x = images_for(m, batch=2)
    t = torch.tensor([0, 3])
    with torch.no_grad():
        feats = nha.adapters.get_spec(m).trunk(x)
    pool_head = Z.LRPReadout(m.visual.attnpool, head.readout, 100.0, True)

    def start(out):
        return out * F.one_hot(t, out.shape[1]).to(out)

    with Gradient(model=pool_head, composite=Z.CLIPResNetEpsilonPlus(epsilon=1e-12, stabilizer=1e-12)) as attributor:
        _, relevance = attributor(feats.clone().requires_grad_(True), start)
    nad = nha.NeuronHeadAttribution(head).attribute(x, target=t, granularity="spatial")[:, 0]
    torch.testing.assert_close(relevance.sum(dim=1), nad, rtol=1e-6, atol=1e-9)


def test_quantus_drives_the_registered_composite(tiny64):
    """Quantus builds zennit composites by name with no arguments but ``canonizers``; its relevance for a one-hot
    output equals ours (which starts from the logit) divided by the logit."""
    quantus = pytest.importorskip("quantus")
    head = _head(tiny64)
    x = images_for(tiny64, batch=2)
    t = torch.tensor([1, 2])
    ours, logits = Z.lrp_attribute(head, x, t, Z.CLIPResNetEpsilonPlus())
    theirs = quantus.explain(model=Z.lrp_readout(head), inputs=x, targets=t.numpy(), xai_lib="zennit",
                             composite="clip_resnet_epsilon_plus", device="cpu")
    expected = (ours.sum(dim=1) / logits.gather(1, t[:, None])[:, :, None]).numpy()
    np.testing.assert_allclose(np.asarray(theirs).reshape(expected.shape), expected, rtol=1e-6, atol=1e-12)
