"""Every adapter gives the same decomposition for the same weights; unsupported models get clear errors."""
import pytest
import torch
import torchvision

import nha_plugin as nha
from nha_plugin.adapters import detect, get_spec
from nha_plugin.spec import UnsupportedModelError

from conftest import images_for


@pytest.fixture(scope="module")
def three_rn50s(rn50_64, timm_rn50):
    """The same RN50 weights in open_clip, OpenAI clip and timm."""
    clip = pytest.importorskip("clip")
    sd = rn50_64.state_dict()
    # clip.model.build_model would round the weights to fp16; build the same architecture without that
    openai_model = clip.model.CLIP(1024, 224, (3, 4, 6, 3), 64, None, 77, 49408, 512, 8, 12)
    openai_model.load_state_dict(sd)
    openai_model = openai_model.double().eval()
    return {"open_clip": rn50_64, "openai_clip": openai_model, "timm": timm_rn50}


def test_detection(three_rn50s):
    for name, model in three_rn50s.items():
        assert detect(model) == name
    assert detect(three_rn50s["open_clip"].visual) == "open_clip"
    assert detect(three_rn50s["openai_clip"].visual) == "openai_clip"


def test_same_decomposition_across_adapters(three_rn50s):
    x = images_for(224, batch=2)
    results = {name: nha.decompose(model, x) for name, model in three_rn50s.items()}
    ref = results["open_clip"]
    e = torch.randn(1024, dtype=torch.float64)
    for name, contrib in results.items():
        assert torch.allclose(contrib.pair_coefficients, ref.pair_coefficients, rtol=1e-10, atol=1e-10), name
        assert torch.allclose(contrib.attention, ref.attention, atol=1e-12), name
        assert torch.allclose(contrib.scores(e, "spatial"), ref.scores(e, "spatial"), atol=1e-10), name
        assert contrib.completeness_error(e, level="pair").max() <= 1e-10, name
    with torch.no_grad():
        assert torch.allclose(three_rn50s["timm"](x), ref.embedding, atol=1e-10)
        assert torch.allclose(three_rn50s["openai_clip"].encode_image(x), ref.embedding, atol=1e-10)


def test_fused_qkv_timm_pool(three_rn50s):
    """timm's AttentionPool2d with one fused qkv projection reads the same weights as the separate layout."""
    from timm.layers.attention_pool2d import AttentionPool2d
    sep = three_rn50s["timm"].head
    fused = AttentionPool2d(2048, feat_size=7, out_features=1024, num_heads=32, qkv_separate=False).double()
    with torch.no_grad():
        fused.qkv.weight.copy_(torch.cat([sep.q.weight, sep.k.weight, sep.v.weight]))
        fused.qkv.bias.copy_(torch.cat([sep.q.bias, sep.k.bias, sep.v.bias]))
        fused.proj.load_state_dict(sep.proj.state_dict())
        fused.pos_embed.copy_(sep.pos_embed)
    model = three_rn50s["timm"]
    x = images_for(224, batch=1)
    before = nha.decompose(model, x).pair_coefficients
    model.head = fused
    try:
        after = nha.decompose(model, x)
        with torch.no_grad():
            assert torch.allclose(model(x), after.embedding, atol=1e-10)
    finally:
        model.head = sep
    assert torch.allclose(before, after.pair_coefficients, atol=1e-10)


def test_vit_is_refused_with_pointer_to_vit_module():
    import open_clip
    vit = open_clip.model.CLIP(embed_dim=32, vision_cfg=dict(layers=1, width=64, patch_size=32, image_size=64,
                                                             head_width=32),
                               text_cfg=dict(context_length=16, vocab_size=100, width=32, heads=1, layers=1))
    with pytest.raises(UnsupportedModelError, match="nha_plugin.vit"):
        get_spec(vit)


def test_other_models_are_refused_with_the_supported_list():
    with pytest.raises(UnsupportedModelError, match="Supported:.*open_clip"):
        get_spec(torchvision.models.resnet18())
    with pytest.raises(UnsupportedModelError, match="nn.Module"):
        get_spec("RN50")


def _state(model):
    """Every module's training flag and a copy of every parameter and buffer."""
    return ({n: m.training for n, m in model.named_modules()},
            {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()})


@pytest.mark.parametrize("name", ["open_clip", "openai_clip", "timm"])
def test_training_mode_is_refused_and_the_model_left_as_it_was(three_rn50s, name):
    import copy

    from nha_plugin.attribution import NeuronHeadAttribution
    from nha_plugin.spec import TrainingModeError
    model = copy.deepcopy(three_rn50s[name]).train()        # a copy: the fixtures are shared by other tests
    x = images_for(224, batch=2)
    flags, tensors = _state(model)
    with pytest.raises(TrainingModeError, match=r"model\.eval\(\)"):
        nha.decompose(model, x)
    readout = torch.randn(1024, 3, dtype=torch.float64)
    nad = NeuronHeadAttribution(lambda z: z, readout=readout, model=model, logit_scale=1.0)
    with pytest.raises(TrainingModeError, match="training mode"):
        nad.attribute(x, target=0)
    after_flags, after_tensors = _state(model)
    assert after_flags == flags and all(after_flags.values())
    assert after_tensors.keys() == tensors.keys()
    assert all(torch.equal(after_tensors[k], v) for k, v in tensors.items())   # running stats untouched
    model.eval()                                            # the same model in eval mode: the eval decomposition
    ref = nha.decompose(three_rn50s[name], x)
    assert torch.equal(nha.decompose(model, x).pair_coefficients, ref.pair_coefficients)


def test_one_training_batchnorm_is_named(tiny64):
    import copy

    from nha_plugin.spec import TrainingModeError
    model = copy.deepcopy(tiny64)
    model.visual.layer4[0].bn2.train()
    with pytest.raises(TrainingModeError, match=r"1 modules, e\.g\. layer4\.0\.bn2"):
        nha.decompose(model, images_for(model))
