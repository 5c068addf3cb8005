import os

import pytest
import torch

from diffiner.script_util import create_model_and_diffusion, model_and_diffusion_defaults
from diffiner.unet import QKVAttention, UNetModel, attention_softmax, set_sdpa

from conftest import REFERENCE, requires_reference, tiny_model_and_diffusion
from tolerances import reordering_atol


@requires_reference("published_unet_state_dict.tsv")
def test_published_state_dict_layout_matches_exactly():
    with open(os.path.join(REFERENCE, "published_unet_state_dict.tsv")) as f:
        expected = [line.rstrip("\n").split("\t") for line in f if line.strip()]
    model, _ = create_model_and_diffusion(**model_and_diffusion_defaults())
    state = model.state_dict()
    assert [name for name, _ in expected] == list(state.keys())
    for name, shape in expected:
        assert str(tuple(state[name].shape)) == shape, name
    assert sum(p.numel() for p in model.parameters()) == 164_303_618


@requires_reference("unet_tiny_reference.pt")
@pytest.mark.parametrize("use_sdpa", [True, False])
def test_tiny_reference_vector_is_reproduced(use_sdpa):
    ref = torch.load(os.path.join(REFERENCE, "unet_tiny_reference.pt"))
    model, _ = create_model_and_diffusion(**ref["config"])
    model.load_state_dict(ref["state_dict"], strict=True)
    set_sdpa(model, use_sdpa)
    with torch.no_grad():
        eps = model.eval()(ref["x"], ref["t"])
    rel = (eps - ref["eps"]).abs().max() / ref["eps"].abs().max()
    assert rel <= 1e-4


def test_sdpa_matches_explicit_softmax():
    torch.manual_seed(0)
    q, k, v = (torch.randn(6, 16, 40) for _ in range(3))
    ref = attention_softmax(q, k, v)
    if not hasattr(torch.nn.functional, "scaled_dot_product_attention"):
        pytest.skip("this torch has no scaled_dot_product_attention")
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    # Each output sums 16 products of softmax weights (at most 1) and values (|v| < 5 for 240
    # standard normal draws), after a softmax over 16 scores of 40 terms each.
    torch.testing.assert_close(out, ref, rtol=0, atol=reordering_atol(torch.float32, 16 * 40, v.abs().max().item()))


def test_new_attention_order_differs_from_legacy_but_both_run():
    torch.manual_seed(0)
    qkv = torch.randn(2, 3 * 4 * 8, 10)
    legacy = QKVAttention(4, legacy_order=True)(qkv)
    new = QKVAttention(4, legacy_order=False)(qkv)
    assert legacy.shape == new.shape == (2, 32, 10)
    assert not torch.allclose(legacy, new)


def test_any_width_multiple_of_downsample_factor_and_clear_error_otherwise():
    model, _ = tiny_model_and_diffusion()
    t = torch.tensor([5, 100])
    assert model.downsample_factor == 8
    with torch.no_grad():
        assert model(torch.randn(2, 2, 256, 24), t).shape == (2, 2, 256, 24)
    with pytest.raises(ValueError, match="multiple of 8"):
        model(torch.randn(2, 2, 256, 10), t)


def test_precision_is_not_a_model_setting():
    # The network never changes precision by itself (the runner decides), so its parameters and
    # state dict are float32, and use_fp16 is refused as a model setting.
    model, _ = create_model_and_diffusion(image_size=64, num_channels=32, num_res_blocks=1)
    assert isinstance(model, UNetModel) and all(p.dtype == torch.float32 for p in model.parameters())
    with pytest.raises(TypeError, match="use_fp16"):
        create_model_and_diffusion(image_size=64, num_channels=32, num_res_blocks=1, use_fp16=True)
