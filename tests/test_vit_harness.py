"""ViT methods in the harness: maps against dense references and torch's own attention, completeness, the
unchanged runner on a ViT, ResNet and ViT side by side, ViT parameter randomisation."""
import json

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_VIT_CFG, images_for, randomise_vit
from nha_plugin import harness as HM
from nha_plugin import vit
from nha_plugin.harness.data import BenchItem
from nha_plugin.harness.randomise import randomised_copies
from nha_plugin.harness.runner import DEFAULT_METHODS, VIT_DEFAULT_METHODS, BenchmarkConfig, methods_for
from nha_plugin.harness.side_by_side import run_side_by_side
from nha_plugin.readout import LinearReadout


def _readout(model, k=3, seed=0, dtype=torch.float64):
    D = model.visual.output_dim
    R = F.normalize(torch.randn(D, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=0)
    return LinearReadout(model, R.to(dtype), logit_scale=100.0)


def test_vit_maps_against_dense_token_table(tiny_vit64):
    fw = _readout(tiny_vit64)
    x = images_for(tiny_vit64, batch=3, seed=1)
    t = torch.tensor([0, 2, 1])
    c = vit.decompose(tiny_vit64, x)
    tok = c.token_contributions().detach()                                # (B, L, H, N, D) dense table
    y = c.embedding.detach()
    scale = 100.0 / y.norm(dim=-1)
    R = fw.readout
    for name, e in (("vit_spatial", R[:, t].T), ("textspan_vit", R[:, t].T - R.mean(dim=1))):
        ex = HM.explain(name, fw, x, t)
        dense = torch.einsum("blhnd,bd->bn", tok, e)[:, 1:].view(3, 4, 4) * scale[:, None, None]
        assert torch.allclose(ex.raw.reshape(3, 4, 4), dense, atol=1e-10, rtol=0), name
    ex = HM.explain("vit_spatial", fw, x, t)
    assert ex.completeness_error.max() < 1e-10 and ex.maps.shape == (3, 64, 64)
    # completeness against the model's own logit: map + class token + MLPs + embedding = logit
    with torch.no_grad():
        logit = fw(x).gather(1, t[:, None])[:, 0]
    rest = (c.rest_score(R[:, t].T, level="spatial", per_image=True) * scale).detach()
    assert torch.allclose(ex.raw.flatten(1).sum(1) + rest, logit, atol=1e-9, rtol=0)


def test_vit_class_attention_matches_torch_attention(tiny_vit64):
    fw = _readout(tiny_vit64)
    x = images_for(tiny_vit64, batch=2, seed=2)
    block = tiny_vit64.visual.transformer.resblocks[-1]
    seen = {}
    handle = block.register_forward_pre_hook(lambda mod, args: seen.setdefault("x", args[0]))
    with torch.no_grad():
        tiny_vit64.encode_image(x)
        handle.remove()
        h = block.ln_1(seen["x"])
        _, w = block.attn(h, h, h, need_weights=True, average_attn_weights=True)     # (B, N, N), mean over heads
    ex = HM.explain("vit_class_attention", fw, x, torch.tensor([0, 1]))
    assert torch.allclose(ex.raw.reshape(2, 16), w[:, 0, 1:], atol=1e-12, rtol=0)


def test_vit_methods_refuse_a_resnet(tiny64, tiny_vit64):
    fw = _readout(tiny64)
    with pytest.raises(TypeError, match="CLIP-ViT"):
        HM.explain("vit_spatial", fw, images_for(tiny64, 1), torch.tensor([0]))
    assert methods_for(tiny64, DEFAULT_METHODS) == list(DEFAULT_METHODS)
    assert methods_for(tiny_vit64, DEFAULT_METHODS) == list(VIT_DEFAULT_METHODS)
    assert methods_for(tiny_vit64, ["saliency"]) == ["saliency"]


def _vit128():
    torch.manual_seed(0)
    cfg = dict(TINY_VIT_CFG, vision_cfg=dict(TINY_VIT_CFG["vision_cfg"], image_size=128))     # 8 x 8 patches
    return randomise_vit(open_clip.model.CLIP(**cfg), 1).eval().float()


def _items(n=2, size=128):
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        mask = np.zeros((size, size), bool)
        mask[16 * i:16 * i + 48, 24:80] = True
        out.append(BenchItem(i, rng.integers(0, 255, (size, size, 3), dtype=np.uint8), mask, ["a", "b", "c"][i]))
    return out


def test_resnet_and_vit_side_by_side(tiny32, tmp_path):
    rn, v = _readout(tiny32, dtype=torch.float32), _readout(_vit128(), dtype=torch.float32)
    cfg = BenchmarkConfig(methods=DEFAULT_METHODS, n=2, n_subset=1, batch_size=2, del_ins_steps=2,
                          metrics=("pointing_game", "mass_in_mask", "segmentation", "deletion_insertion",
                                   "completeness_error", "seconds_per_image", "randomisation"),
                          randomisation_stages=("attnpool",), quiet=True)
    rn_cfg = BenchmarkConfig(**{**cfg.__dict__, "methods": ("nad_spatial", "centre")})
    vit_methods = ("vit_spatial", "textspan_vit", "vit_class_attention", "saliency", "centre")
    vit_cfg = BenchmarkConfig(**{**cfg.__dict__, "methods": vit_methods})
    merged = run_side_by_side({"rn": rn_cfg, "vit": vit_cfg}, str(tmp_path), forwards={"rn": rn, "vit": v},
                                 items=_items(), classes=["a", "b", "c"])
    assert set(merged["methods"]) == {"rn:nad_spatial", "rn:centre"} | {f"vit:{m}" for m in vit_methods}
    for m in vit_methods:
        e = merged["methods"][f"vit:{m}"]
        assert e["n_images"] == 2 and 0 <= e["mass_in_mask"]["mean"] <= 1 and "deletion_auc" in e
    assert merged["methods"]["vit:vit_spatial"]["completeness_error"]["mean"] < 1e-4
    assert merged["methods"]["rn:nad_spatial"]["completeness_error"]["mean"] < 1e-4
    # the same images and targets: the floor that ignores the model scores identically for both
    for k in ("pointing_game", "mass_in_mask"):
        assert merged["methods"]["rn:centre"][k] == merged["methods"]["vit:centre"][k]
    saved = json.loads((tmp_path / "side_by_side.json").read_text())
    assert set(saved["protocol"]) == {"rn", "vit"}
    assert "| vit:vit_spatial |" in (tmp_path / "side_by_side.md").read_text()
    assert (tmp_path / "vit" / "results.json").exists() and (tmp_path / "rn" / "heatmaps.png").exists()


def test_vit_randomisation_stages():
    fw = _readout(_vit128(), dtype=torch.float32)
    before = {n: p.detach().clone() for n, p in fw.model.visual.named_parameters()}
    head, last, embed = randomised_copies(fw, ("attnpool", "last_block", "stem"), seed=3)
    changed = lambda f: {n for n, p in f.model.visual.named_parameters() if not torch.equal(p, before[n])}  # noqa
    assert changed(head) == {"proj", "ln_post.weight", "ln_post.bias"}
    assert changed(last) == changed(head) | {n for n in before if n.startswith("transformer.resblocks.2.")}
    assert changed(embed) == set(before)                          # cascading down to the patch embedding
    assert all(torch.equal(p, before[n]) for n, p in fw.model.visual.named_parameters())     # original untouched
    x = images_for(128, batch=1, dtype=torch.float32)
    with torch.no_grad():
        assert not torch.allclose(head(x), fw(x))
    with pytest.raises(ValueError, match=r"unknown ViT stage\(s\) \[.layer9.\]"):
        randomised_copies(fw, ("layer9",))


def test_vit_maskclip_matches_torch_modules(tiny_vit64):
    fw = _readout(tiny_vit64)
    x = images_for(tiny_vit64, batch=2, seed=5)
    t = torch.tensor([1, 2])
    visual = tiny_vit64.visual
    block = visual.transformer.resblocks[-1]
    seen = {}
    handle = block.register_forward_pre_hook(lambda mod, args: seen.setdefault("x", args[0]))
    with torch.no_grad():
        tiny_vit64.encode_image(x)
        handle.remove()
        W = visual.transformer.width
        h = block.ln_1(seen["x"])
        v = h @ block.attn.in_proj_weight[2 * W:].T + block.attn.in_proj_bias[2 * W:]
        z = visual.ln_post(block.attn.out_proj(v)) @ visual.proj                # (B, N, D)
        ref = F.cosine_similarity(z[:, 1:], fw.readout[:, t].T[:, None], dim=-1).view(2, 4, 4)
    assert torch.allclose(HM.explain("vit_maskclip", fw, x, t).raw, ref, atol=1e-12, rtol=0)
