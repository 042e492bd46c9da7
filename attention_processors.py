"""Cross-attention processors that steer DeltaDeno's anomaly tokens to the predicted defect region.

During masked inpainting (phase 2) the anomaly branch's cross-attention gets an
additive bias on the logits of the anomaly-token columns: `bias_inside` where
the query pixel lies in the defect region, `bias_outside` elsewhere, and zero
for every other token, every other batch row and every self-attention layer.
The bias goes in as the float `attn_mask` of
`torch.nn.functional.scaled_dot_product_attention`, which computes
softmax(QK^T / sqrt(d) + bias) V, so the fused kernels stay in use.

While the bias is inactive (phase 1, or both magnitudes zero) every call is
handed to the processor that was installed before ours, so LoRA, fused
projections or a custom processor keep working unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

# The memory-efficient SDPA kernel needs the key length of a float mask aligned
# to 8 elements. The mask is allocated at the padded width and sliced back to
# the true key length, so its row stride stays aligned.
_KEY_LENGTH_ALIGNMENT = 8


@dataclass
class AnomalyAttentionState:
    """Per-call state shared by all DeltaDeno processors of one UNet.

    Attributes:
        region: `(batch, 1, h, w)` defect region at latent resolution, values in [0, 1].
        anomaly_columns: `(batch, key_length)` bool, True at the anomaly-token positions.
        anomaly_rows: slice of the UNet batch that contains the anomaly branch.
        unet_batch_size: full batch of the UNet call the bias is built for.
        bias_inside: logit bias for anomaly tokens inside the region.
        bias_outside: logit bias for anomaly tokens outside the region.
        active: the bias is applied only while this is True.
    """

    region: torch.Tensor | None = None
    anomaly_columns: torch.Tensor | None = None
    anomaly_rows: slice = field(default_factory=lambda: slice(0, 0))
    unet_batch_size: int = 0
    bias_inside: float = 0.0
    bias_outside: float = 0.0
    active: bool = False
    _bias_cache: dict = field(default_factory=dict)

    def activate(
        self,
        region: torch.Tensor,
        anomaly_columns: torch.Tensor,
        anomaly_rows: slice,
        unet_batch_size: int,
        bias_inside: float,
        bias_outside: float,
    ) -> None:
        """Set the region and token columns for the following UNet calls and clear cached biases."""
        self.region = region
        self.anomaly_columns = anomaly_columns
        self.anomaly_rows = anomaly_rows
        self.unet_batch_size = unet_batch_size
        self.bias_inside = float(bias_inside)
        self.bias_outside = float(bias_outside)
        self.active = bias_inside != 0.0 or bias_outside != 0.0
        self._bias_cache.clear()

    def deactivate(self) -> None:
        """Stop applying the bias and drop every tensor the state holds."""
        self.active = False
        self.region = None
        self.anomaly_columns = None
        self._bias_cache.clear()

    def bias_for(self, query_length: int, key_length: int, dtype: torch.dtype) -> torch.Tensor:
        """Return the `(unet_batch, 1, query_length, key_length)` additive mask for one layer size.

        Biases are built once per layer resolution and reused for every later
        layer and step of the same resolution until the next `activate`.
        """
        cache_key = (query_length, key_length, dtype)
        bias = self._bias_cache.get(cache_key)
        if bias is not None:
            return bias

        latent_height, latent_width = self.region.shape[-2:]
        layer_height, layer_width = layer_spatial_size(latent_height, latent_width, query_length)
        # A layer cell counts as inside when any latent pixel under it is inside. With the
        # covered fraction instead, small defects got a mostly negative bias at coarse layers.
        coverage = F.adaptive_max_pool2d(self.region.float(), (layer_height, layer_width))
        coverage = coverage.flatten(1)  # (batch, query_length)
        pixel_bias = self.bias_outside + (self.bias_inside - self.bias_outside) * coverage

        columns = self.anomaly_columns[:, :key_length].float()  # (batch, key_length)
        anomaly_bias = pixel_bias[:, :, None] * columns[:, None, :]  # (batch, query, key)

        padded_length = math.ceil(key_length / _KEY_LENGTH_ALIGNMENT) * _KEY_LENGTH_ALIGNMENT
        bias = torch.zeros(
            self.unet_batch_size, 1, query_length, padded_length, dtype=dtype, device=self.region.device
        )
        bias[self.anomaly_rows, 0, :, :key_length] = anomaly_bias.to(dtype)
        bias = bias[..., :key_length]
        self._bias_cache[cache_key] = bias
        return bias


def layer_spatial_size(latent_height: int, latent_width: int, query_length: int) -> tuple[int, int]:
    """Solve ceil(H / s) * ceil(W / s) == query_length for the UNet downsampling factor s."""
    for factor in (1, 2, 4, 8, 16, 32, 64):
        height = math.ceil(latent_height / factor)
        width = math.ceil(latent_width / factor)
        if height * width == query_length:
            return height, width
    raise ValueError(
        f"cannot map {query_length} query positions onto a {latent_height}x{latent_width} latent "
        "by any power-of-two downsampling; the UNet layout is not supported by DeltaDeno's attention bias."
    )


class DeltaDenoAttnProcessor:
    """Cross-attention processor adding the anomaly-token spatial bias of the shared state.

    Args:
        state: the call's `AnomalyAttentionState`, shared by every processor of the UNet.
        fallback: the processor that was installed before; it handles every call
            made while the bias is inactive.
    """

    def __init__(self, state: AnomalyAttentionState, fallback):
        self.state = state
        self.fallback = fallback

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        if not self.state.active or encoder_hidden_states is None:
            return self.fallback(
                attn,
                hidden_states,
                encoder_hidden_states=encoder_hidden_states,
                attention_mask=attention_mask,
                temb=temb,
            )
        return self._biased_attention(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

    def _biased_attention(self, attn, hidden_states, encoder_hidden_states, attention_mask, temb):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        batch_size, query_length, _ = hidden_states.shape
        key_length = encoder_hidden_states.shape[1]
        if batch_size != self.state.unet_batch_size:
            raise RuntimeError(
                f"DeltaDeno's attention bias was built for a UNet batch of {self.state.unet_batch_size} "
                f"but the UNet was called with {batch_size}; was the UNet called from outside the pipeline?"
            )

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        # (batch, 1, query_length, key_length), broadcast over heads by SDPA.
        bias = self.state.bias_for(query_length, key_length, query.dtype)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, key_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
            bias = bias + attention_mask

        hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=bias, dropout_p=0.0)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def cross_attention_processor_names(unet) -> list[str]:
    """Return the `attn_processors` keys of the UNet's cross-attention layers."""
    names = []
    for module_name, module in unet.named_modules():
        if getattr(module, "is_cross_attention", False) and hasattr(module, "processor"):
            names.append(f"{module_name}.processor")
    return names


def unsupported_processor_error(processors: dict) -> str | None:
    """Return an error message if a processor cannot be combined with DeltaDeno's bias, else None."""
    for name, processor in processors.items():
        class_name = type(processor).__name__
        if "IPAdapter" in class_name:
            return (
                f"IP-Adapter processor {class_name} is installed at {name}; DeltaDeno's attention bias "
                "does not support IP-Adapter image prompts. Call pipe.unload_ip_adapter() first."
            )
    return None
