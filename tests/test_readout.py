"""Linear read-outs: the contrastive read-out is the logit minus the mean logit."""


def test_contrastive_readout_is_logit_minus_mean():
    import torch

    from conftest import images_for, make_tiny
    from nha_plugin.readout import LinearReadout, contrastive
    model = make_tiny(torch.float64)
    x = images_for(model, 3)
    W = torch.randn(64, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    plain = LinearReadout(model, W, logit_scale=10.0, normalize=True, labels=list("abcd"))
    with torch.no_grad():
        ref = plain(x) - plain(x).mean(dim=1, keepdim=True)
        torch.testing.assert_close(contrastive(plain)(x), ref, rtol=1e-12, atol=1e-12)


def test_templates_need_exactly_one_placeholder():
    import open_clip
    import pytest
    import torch

    from conftest import make_tiny
    from nha_plugin.readout import ZeroShotClassifier, check_templates
    assert check_templates(("a photo of a {}.", "{{literal}} {}")) == ["a photo of a {}.", "{{literal}} {}"]
    bad = [(["a photo"], ValueError, "no '{}'"), (["{} and {}"], ValueError, "2 field"),
           (["a {0}"], ValueError, "exactly one"), (["a {name}"], ValueError, "exactly one"),
           (["a { photo"], ValueError, "not a valid format string"), ([], ValueError, "empty"),
           ("a photo of a {}.", TypeError, "list of format strings"), ([3], TypeError, "not a str")]
    for templates, err, message in bad:
        with pytest.raises(err, match=message):
            check_templates(templates)
    model, tok = make_tiny(torch.float64), open_clip.tokenizer.SimpleTokenizer()
    for templates, err, message in bad[:2]:
        with pytest.raises(err, match=message):
            ZeroShotClassifier(model, tok, ["cat", "dog"], templates=templates)


def test_linear_readout_refuses_nan_and_zero_columns():
    import pytest
    import torch

    from conftest import make_tiny
    from nha_plugin.readout import LinearReadout, contrastive, contrastive_columns
    model = make_tiny(torch.float64)
    W = torch.randn(64, 3, dtype=torch.float64)
    for value, message in ((0.0, "readout column 2 is zero"), (float("nan"), "readout column 2 holds NaN")):
        bad = W.clone()
        bad[:, 2] = value
        with pytest.raises(ValueError, match=message):
            LinearReadout(model, bad)
    # a contrastive read-out of two equal columns has nothing left to separate them: refused, not NaN
    with pytest.raises(ValueError, match="column 0 is zero"):
        contrastive(LinearReadout(model, torch.cat([W[:, :1], W[:, :1]], dim=1)))
    with pytest.raises(ValueError, match="K >= 2"):
        contrastive_columns(W[:, :1])
    torch.testing.assert_close(contrastive_columns(W).sum(dim=1), torch.zeros(64, dtype=torch.float64),
                               rtol=0, atol=1e-12 * float(W.abs().max()))
