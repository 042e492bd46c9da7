"""The anomaly-token attention bias: exactness, which entries it touches, layer sizes."""

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from attention_processors import AnomalyAttentionState, DeltaDenoAttnProcessor, layer_spatial_size


def make_cross_attention():
    torch.manual_seed(0)
    return Attention(query_dim=16, cross_attention_dim=8, heads=2, dim_head=8).eval()


def active_state(region, columns, rows, batch, inside=2.0, outside=-8.0):
    state = AnomalyAttentionState()
    state.activate(region, columns, rows, batch, inside, outside)
    return state


@pytest.mark.parametrize(
    "latent_size, query_length, expected",
    [((8, 8), 64, (8, 8)), ((12, 8), 24, (6, 4)), ((9, 13), 12, (3, 4)), ((9, 13), 117, (9, 13))],
)
def test_layer_spatial_size(latent_size, query_length, expected):
    assert layer_spatial_size(*latent_size, query_length) == expected


def test_layer_spatial_size_rejects_impossible():
    with pytest.raises(ValueError, match="cannot map 7 query positions"):
        layer_spatial_size(8, 8, 7)


def test_processor_inactive_equals_default_exactly():
    attn = make_cross_attention()
    hidden = torch.randn(2, 16, 16)
    context = torch.randn(2, 5, 8)
    state = AnomalyAttentionState()
    ours = DeltaDenoAttnProcessor(state, AttnProcessor2_0())(attn, hidden, context)
    default = AttnProcessor2_0()(attn, hidden, context)
    assert torch.equal(ours, default)


def test_processor_zero_bias_equals_default_exactly():
    attn = make_cross_attention()
    hidden = torch.randn(2, 16, 16)
    context = torch.randn(2, 5, 8)
    columns = torch.zeros(1, 5, dtype=torch.bool)
    columns[0, 2] = True
    state = active_state(torch.ones(1, 1, 4, 4), columns, slice(1, 2), 2, inside=0.0, outside=0.0)
    ours = DeltaDenoAttnProcessor(state, AttnProcessor2_0())(attn, hidden, context)
    assert torch.equal(ours, AttnProcessor2_0()(attn, hidden, context))


def test_processor_leaves_self_attention_to_fallback():
    attn = Attention(query_dim=16, heads=2, dim_head=8).eval()
    hidden = torch.randn(2, 16, 16)
    columns = torch.ones(1, 16, dtype=torch.bool)
    state = active_state(torch.ones(1, 1, 4, 4), columns, slice(1, 2), 2)
    ours = DeltaDenoAttnProcessor(state, AttnProcessor2_0())(attn, hidden)
    assert torch.equal(ours, AttnProcessor2_0()(attn, hidden))


def test_bias_touches_only_anomaly_columns_of_anomaly_rows():
    region = torch.zeros(1, 1, 4, 4)
    region[..., :2, :] = 1
    columns = torch.zeros(1, 6, dtype=torch.bool)
    columns[0, [2, 3]] = True
    state = active_state(region, columns, slice(1, 2), 2, inside=1.5, outside=-7.0)
    bias = state.bias_for(16, 6, torch.float32)
    assert bias.shape == (2, 1, 16, 6)
    assert torch.count_nonzero(bias[0]) == 0
    assert torch.count_nonzero(bias[1][..., [0, 1, 4, 5]]) == 0
    inside_rows = region.flatten().bool()
    assert torch.all(bias[1, 0, inside_rows][:, [2, 3]] == 1.5)
    assert torch.all(bias[1, 0, ~inside_rows][:, [2, 3]] == -7.0)


def test_bias_equals_explicit_logit_bias():
    attn = make_cross_attention()
    hidden = torch.randn(2, 16, 16)
    context = torch.randn(2, 5, 8)
    region = torch.zeros(1, 1, 4, 4)
    region[..., 1:3, 1:3] = 1
    columns = torch.zeros(1, 5, dtype=torch.bool)
    columns[0, 3] = True
    state = active_state(region, columns, slice(1, 2), 2, inside=2.0, outside=-8.0)
    ours = DeltaDenoAttnProcessor(state, AttnProcessor2_0())(attn, hidden, context)

    query = attn.to_q(hidden).view(2, 16, 2, 8).transpose(1, 2)
    key = attn.to_k(context).view(2, 5, 2, 8).transpose(1, 2)
    value = attn.to_v(context).view(2, 5, 2, 8).transpose(1, 2)
    logits = query @ key.transpose(-1, -2) / 8**0.5
    logits[1, :, region.flatten().bool(), 3] += 2.0
    logits[1, :, ~region.flatten().bool(), 3] -= 8.0
    expected = (logits.softmax(-1) @ value).transpose(1, 2).reshape(2, 16, 16)
    expected = attn.to_out[0](expected)
    assert torch.allclose(ours, expected, atol=1e-5)


def test_bias_leaves_normal_rows_unchanged():
    attn = make_cross_attention()
    hidden = torch.randn(2, 16, 16)
    context = torch.randn(2, 5, 8)
    columns = torch.zeros(1, 5, dtype=torch.bool)
    columns[0, 1] = True
    state = active_state(torch.ones(1, 1, 4, 4), columns, slice(1, 2), 2)
    ours = DeltaDenoAttnProcessor(state, AttnProcessor2_0())(attn, hidden, context)
    default = AttnProcessor2_0()(attn, hidden, context)
    assert torch.allclose(ours[0], default[0], atol=1e-6)
    assert not torch.allclose(ours[1], default[1], atol=1e-3)


def test_bias_resized_to_non_square_layer():
    region = torch.zeros(1, 1, 12, 8)
    region[..., :6, :] = 1  # top half
    columns = torch.ones(1, 3, dtype=torch.bool)
    state = active_state(region, columns, slice(0, 1), 1, inside=1.0, outside=-1.0)
    bias = state.bias_for(6 * 4, 3, torch.float32)[0, 0, :, 0].view(6, 4)
    assert torch.all(bias[:3] == 1.0)
    assert torch.all(bias[3:] == -1.0)


def test_bias_built_in_query_dtype_and_aligned_stride():
    columns = torch.ones(1, 77, dtype=torch.bool)
    state = active_state(torch.ones(1, 1, 4, 4), columns, slice(0, 1), 1)
    bias = state.bias_for(16, 77, torch.bfloat16)
    assert bias.dtype == torch.bfloat16
    assert bias.shape[-1] == 77
    assert bias.stride(-2) % 8 == 0


def test_bias_cached_per_resolution():
    columns = torch.ones(1, 5, dtype=torch.bool)
    state = active_state(torch.ones(1, 1, 4, 4), columns, slice(0, 1), 1)
    assert state.bias_for(16, 5, torch.float32) is state.bias_for(16, 5, torch.float32)
    state.deactivate()
    assert state.region is None
    assert not state.active


def test_sdpa_float_mask_equals_added_logits():
    torch.manual_seed(0)
    query, key, value = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    bias = torch.randn(1, 1, 4, 5)
    expected = ((query @ key.transpose(-1, -2)) / 8**0.5 + bias).softmax(-1) @ value
    assert torch.allclose(F.scaled_dot_product_attention(query, key, value, attn_mask=bias), expected, atol=1e-6)


def test_bias_small_region_inside_at_coarse_layer():
    region = torch.zeros(1, 1, 8, 8)
    region[..., 5, 2] = 1  # one latent pixel, inside the layer cell (1, 0) at 4x downsampling
    columns = torch.ones(1, 2, dtype=torch.bool)
    state = active_state(region, columns, slice(0, 1), 1, inside=1.0, outside=-8.0)
    bias = state.bias_for(4, 2, torch.float32)[0, 0, :, 0].view(2, 2)
    assert bias[1, 0] == 1.0
    assert torch.all(bias.flatten()[[0, 1, 3]] == -8.0)
