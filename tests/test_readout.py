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
