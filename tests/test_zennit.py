"""zennit front door: the CLIP composites registered by importing the harness, the silent misuse refused, and
the per-layer conservation table checked against conservation where LRP must conserve and against the input
relevance of an independent lrp_attribute call."""
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from zennit.attribution import Gradient

from nha_plugin.adapters import zennit as Z
from nha_plugin.readout import LinearReadout

from conftest import images_for, make_bias_free


def _head(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    return LinearReadout(model, F.normalize(torch.randn(64, 5, generator=g, dtype=torch.float64), dim=0),
                         logit_scale=100.0)


def test_importing_the_harness_registers_the_composites_by_name():
    code = ("import zennit.composites as C; names = {n!r}; assert not set(names) & set(C.COMPOSITES); "
            "import nha_plugin.harness; missing = set(names) - set(C.COMPOSITES); assert not missing, missing; "
            "print(sorted(C.COMPOSITES[n].__name__ for n in names))").format(n=Z.COMPOSITE_NAMES)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['CLIPResNetEpsilonGammaBox', 'CLIPResNetEpsilonPlus']"


def test_composite_on_a_cosine_readout_is_refused_and_leaves_the_model(tiny64):
    head = _head(tiny64)
    x = images_for(tiny64, batch=1)
    before = head(x)
    with pytest.raises(ValueError, match="cosine read-out.*lrp_readout"):
        with Gradient(model=head, composite=Z.CLIPResNetEpsilonGammaBox()) as attributor:
            attributor(x.clone().requires_grad_(True), torch.ones_like(before))
    assert torch.equal(head(x), before)
    block = tiny64.visual.layer2[0]
    assert not hasattr(block, "canonizer_sum") and "forward" not in block.__dict__


def test_conservation_table(tiny64):
    t = torch.tensor([1, 4])
    x = images_for(tiny64, batch=2)
    # without biases every stage conserves the logit (LRP's defining property)
    rows = Z.conservation_table(_head(make_bias_free(tiny64)), x, t, Z.CLIPResNetEpsilonPlus())
    assert [r["stage"] for r in rows] == ["logit", "attnpool", "layer4", "layer3", "layer2", "layer1", "input"]
    for r in rows:
        torch.testing.assert_close(r["fraction"], torch.ones(2, dtype=torch.float64), atol=0.03, rtol=0)
    # with biases: the last row is the input relevance of an independent lrp_attribute call, the first the logit
    head = _head(tiny64)
    rows = Z.conservation_table(head, x, t)
    relevance, logits = Z.lrp_attribute(head, x, t)
    logit = logits.gather(1, t[:, None])[:, 0]
    torch.testing.assert_close(rows[0]["relevance"], logit, rtol=1e-10, atol=0)
    torch.testing.assert_close(rows[-1]["relevance"], relevance.flatten(1).sum(1), rtol=1e-8,
                               atol=1e-10 * logit.abs().max().item())
    assert float(sum(r["lost"] for r in rows).abs().max()) > 0.01       # a real model leaks somewhere
    assert torch.equal(head(x), _head(tiny64)(x))                       # hooks removed, model unchanged
