"""nha_plugin.pool: the PC sign rule against the paper's recipe written out with an SVD, exact 25/25 ties through
every user of the rule (streaming statistics, the shift monitor's signs), and the pool output against the model."""
import pytest
import torch

from conftest import images_for, make_tiny
from nha_plugin.adapters import get_spec
from nha_plugin.applications.shift import pc0_signs
from nha_plugin.pool import class_attention, pc_sign, pool_output, positional_embedding_for, tokens
from nha_plugin.stats import DatasetStats


def _paper_sign(contributions: torch.Tensor, direction: torch.Tensor, top: int = 50):
    """The NAD paper's code for one pair: centre its dense contributions (N, D), keep the `top` largest by norm,
    first right singular vector, flip unless more than top/2 project positively. Returns the sign of the result
    against `direction`, or None at an exact tie (there the paper's sign is whatever its SVD returned)."""
    xc = contributions - contributions.mean(dim=0)
    sel = xc[xc.norm(dim=1).argsort(descending=True)[:top]]
    v = torch.linalg.svd(sel, full_matrices=False).Vh[0]
    positive = int((sel @ v > 0).sum())
    if 2 * positive == len(sel):
        return None
    if 2 * positive < len(sel):
        v = -v
    return 1 if float(v @ direction) > 0 else -1


def test_pc_sign_is_the_papers_recipe():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(70, 3, 5, generator=g, dtype=torch.float64) ** 3          # skewed, so signs differ
    u = torch.randn(3, 5, 8, generator=g, dtype=torch.float64)                 # any pair directions
    got = pc0_signs(s, top=50)
    checked = 0
    for h in range(3):
        for n in range(5):
            want = _paper_sign(s[:, h, n, None] * u[h, n], u[h, n])
            if want is not None:
                assert got[h, n] == want, (h, n)
                checked += 1
    assert checked >= 12 and set(got.flatten().tolist()) == {1.0, -1.0}


@pytest.mark.parametrize("n_above, want", [(25, -1), (26, 1), (24, -1)])
def test_exact_ties_resolve_the_same_everywhere(n_above, want):
    """50 samples per pair, symmetric about 0: n_above of them above the mean. 25/25 is an exact tie."""
    spec = get_spec(make_tiny(torch.float64)).detached()
    H, C = spec.num_heads, spec.num_neurons
    mags = torch.linspace(1.0, 2.0, 50, dtype=torch.float64)
    signs = torch.tensor([1.0] * n_above + [-1.0] * (50 - n_above), dtype=torch.float64)
    col = mags * signs
    col = col - col.mean()                                                     # the mean is (numerically) 0
    assert int((col > 0).sum()) == n_above
    s = col.view(50, 1, 1).expand(50, H, C).contiguous()
    assert int(pc_sign(col)) == want
    assert (pc0_signs(s, top=50) == want).all()
    st = DatasetStats.empty(spec, k=50)
    st.update(s, torch.arange(50))
    assert (st.pc0_sign == want).all()
    if n_above != 25:                                                          # the paper agrees off a tie
        assert _paper_sign(col[:, None] * torch.ones(1, 4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)) == want


def test_pool_output_is_the_models_attention_pool():
    model = make_tiny(torch.float64)
    spec = get_spec(model).detached()
    x = images_for(model, batch=3, seed=4)
    with torch.no_grad():
        feats = spec.trunk(x)
        z = tokens(feats, positional_embedding_for(spec, feats.shape[-2:]))
        y = pool_output(spec, torch.einsum("bht,btn->bhn", class_attention(spec, z), z))
        ref = model.visual.attnpool(feats)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-12 * float(ref.abs().max()))
