"""DeltaDeno's cross-attention processors against diffusers' `AttnProcessor2_0`, per layer and per UNet call.

Both comparisons use the real modules of the pipeline's UNet, a classifier-free
guidance batch of 2 (DeltaDeno's inpainting phase runs [negative, anomaly]) and
a 77-token text context. DeltaDeno's processors get an active bias state set
up as in the inpainting phase: a centred region covering about a tenth of the
latent, the anomaly tokens of the benchmark prompt pair, the default biases.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.models.attention_processor import AttnProcessor2_0

# bench.cases puts the repository root on sys.path, so it comes before DeltaDeno's modules.
from bench.cases import ANOMALY_PROMPT, MASK_AREA_FRACTION, PROMPT, SEED, Settings
from bench.measure import median, time_interleaved

from attention_processors import AnomalyAttentionState, DeltaDenoAttnProcessor, cross_attention_processor_names
from pipeline_deltadeno import DeltaDenoPipeline

# DeltaDeno's inpainting phase runs the UNet on [negative, anomaly].
CFG_BATCH = 2
TIMESTEP = 500


@dataclass
class CrossAttentionLayer:
    """One cross-attention module of the UNet and the input shapes it receives."""

    name: str
    module: torch.nn.Module
    hidden_shape: tuple[int, ...]
    context_shape: tuple[int, ...]


def record_cross_attention_layers(unet, sample: torch.Tensor, timestep, context: torch.Tensor) -> list[CrossAttentionLayer]:
    """Run one UNet call and return every cross-attention module with its input shapes, in call order."""
    names = {name.removesuffix(".processor") for name in cross_attention_processor_names(unet)}
    layers: list[CrossAttentionLayer] = []
    handles = []

    def make_hook(name):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            layers.append(CrossAttentionLayer(name, module, tuple(hidden.shape), tuple(kwargs["encoder_hidden_states"].shape)))

        return hook

    for name, module in unet.named_modules():
        if name in names:
            handles.append(module.register_forward_pre_hook(make_hook(name), with_kwargs=True))
    try:
        with torch.no_grad():
            unet(sample, timestep, encoder_hidden_states=context, return_dict=False)
    finally:
        for handle in handles:
            handle.remove()
    return layers


def anomaly_token_columns(pipe: DeltaDenoPipeline, batch: int, key_length: int) -> torch.Tensor:
    """Return `(batch, key_length)` bool columns at the anomaly tokens that the pipeline finds for the prompt pair."""
    positions = pipe.find_anomaly_tokens(PROMPT, ANOMALY_PROMPT).anomaly_positions
    columns = torch.zeros(batch, key_length, dtype=torch.bool)
    columns[:, positions] = True
    return columns


def active_attention_state(
    latent_height: int, latent_width: int, columns: torch.Tensor, unet_batch: int, device: str, dtype: torch.dtype
) -> AnomalyAttentionState:
    """Return a bias state as in the inpainting phase: anomaly rows last in the batch, default bias magnitudes."""
    anomaly_batch = columns.shape[0]
    region = torch.zeros(anomaly_batch, 1, latent_height, latent_width, device=device, dtype=dtype)
    side_h = max(1, round(latent_height * MASK_AREA_FRACTION**0.5))
    side_w = max(1, round(latent_width * MASK_AREA_FRACTION**0.5))
    top, left = (latent_height - side_h) // 2, (latent_width - side_w) // 2
    region[..., top : top + side_h, left : left + side_w] = 1.0
    state = AnomalyAttentionState()
    state.activate(
        region=region,
        anomaly_columns=columns.to(device),
        anomaly_rows=slice(unet_batch - anomaly_batch, unet_batch),
        unet_batch_size=unet_batch,
        bias_inside=1.0,
        bias_outside=-8.0,
    )
    return state


def deltadeno_processors(unet, state: AnomalyAttentionState) -> dict:
    """Return the UNet's processors with every cross-attention one wrapped as DeltaDeno's pipeline wraps them."""
    current = dict(unet.attn_processors)
    cross_names = set(cross_attention_processor_names(unet))
    return {
        name: DeltaDenoAttnProcessor(state, processor) if name in cross_names else processor
        for name, processor in current.items()
    }


def benchmark_attention(pipe: DeltaDenoPipeline, settings: Settings, repeats: int, min_sample_seconds: float) -> dict:
    """Time the cross-attention layers one resolution at a time, then whole UNet calls, ours against the default.

    Returns {"layers": [...], "unet": [...]}: per resolution the query and key
    lengths, the channel count, how many cross-attention layers of the UNet have
    that shape and the median seconds per call of each processor; per UNet
    variant the median seconds per call.
    """
    unet = pipe.unet
    device, dtype = settings.device, settings.dtype
    latent_side = settings.size // pipe.vae_scale_factor
    generator = torch.Generator("cpu").manual_seed(SEED)
    sample = torch.randn((CFG_BATCH, unet.config.in_channels, latent_side, latent_side), generator=generator)
    context = torch.randn((CFG_BATCH, pipe.tokenizer.model_max_length, unet.config.cross_attention_dim), generator=generator)
    sample, context = sample.to(device, dtype), context.to(device, dtype)
    timestep = torch.tensor(TIMESTEP, device=device)

    default_processors = {name: AttnProcessor2_0() for name in unet.attn_processors}
    saved_processors = dict(unet.attn_processors)
    unet.set_attn_processor(dict(default_processors))
    columns = anomaly_token_columns(pipe, CFG_BATCH // 2, context.shape[1])
    state = active_attention_state(latent_side, latent_side, columns, CFG_BATCH, device, dtype)
    try:
        layers = _benchmark_layers(unet, sample, timestep, context, state, device, repeats, min_sample_seconds)
        unet_rows = _benchmark_unet(unet, sample, timestep, context, state, default_processors, device, repeats)
    finally:
        state.deactivate()
        unet.set_attn_processor(saved_processors)
    return {"layers": layers, "unet": unet_rows}


def _benchmark_layers(unet, sample, timestep, context, state, device, repeats, min_sample_seconds) -> list[dict]:
    recorded = record_cross_attention_layers(unet, sample, timestep, context)
    by_shape: dict[tuple[int, ...], list[CrossAttentionLayer]] = {}
    for layer in recorded:
        by_shape.setdefault(layer.hidden_shape, []).append(layer)

    rows = []
    generator = torch.Generator("cpu").manual_seed(SEED)
    for hidden_shape, group in by_shape.items():
        module = group[0].module
        hidden = torch.randn(hidden_shape, generator=generator).to(device=sample.device, dtype=sample.dtype)
        ours = DeltaDenoAttnProcessor(state, AttnProcessor2_0())
        default = AttnProcessor2_0()

        # Through `Attention.forward`, as the UNet calls it; assigning the processor is untimed.
        def use(processor):
            return lambda: setattr(module, "processor", processor)

        def call():
            return module(hidden, encoder_hidden_states=context)

        with torch.no_grad():
            samples = time_interleaved(
                {"default": call, "deltadeno": call},
                repeats,
                device,
                warmup_rounds=1,
                min_sample_seconds=min_sample_seconds,
                prepare={"default": use(default), "deltadeno": use(ours)},
            )
        module.set_processor(default)
        query_length = hidden_shape[1] if len(hidden_shape) == 3 else hidden_shape[2] * hidden_shape[3]
        rows.append(
            {
                "query_length": query_length,
                "key_length": context.shape[1],
                "channels": hidden_shape[-1] if len(hidden_shape) == 3 else hidden_shape[1],
                "heads": module.heads,
                "count": len(group),
                "default_s": median(samples["default"]),
                "deltadeno_s": median(samples["deltadeno"]),
            }
        )
    return rows


def _benchmark_unet(unet, sample, timestep, context, state, default_processors, device, repeats) -> list[dict]:
    inactive_state = AnomalyAttentionState()
    variants = {
        "default": default_processors,
        "deltadeno_active": deltadeno_processors(unet, state),
        "deltadeno_inactive": deltadeno_processors(unet, inactive_state),
    }

    def call():
        return unet(sample, timestep, encoder_hidden_states=context, return_dict=False)

    with torch.no_grad():
        samples = time_interleaved(
            {key: call for key in variants},
            repeats,
            device,
            warmup_rounds=1,
            prepare={key: (lambda processors=processors: unet.set_attn_processor(dict(processors))) for key, processors in variants.items()},
        )
    labels = {
        "default": "UNet call, `AttnProcessor2_0` everywhere",
        "deltadeno_active": "UNet call, DeltaDeno processors, bias active (inpainting phase)",
        "deltadeno_inactive": "UNet call, DeltaDeno processors, bias inactive (attribution phase)",
    }
    return [{"key": key, "label": labels[key], "median_s": median(samples[key])} for key in variants]
