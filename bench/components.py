"""Stable Diffusion components with random weights: the SD 1.5 architecture, or tiny test-sized ones.

Speed and memory do not depend on the weight values, so components built from
the published Stable Diffusion 1.5 configs (the `unet`, `vae` and
`text_encoder` folders of the v1.5 checkpoint) stand in for the real
checkpoint. The tokenizer is the real CLIP tokenizer, rebuilt offline from
open_clip_torch's BPE file by `small_model/clip_tokenizer.py`.
"""

from __future__ import annotations

import os
import sys

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# UNet2DConditionModel config of Stable Diffusion 1.5. diffusers reads
# `attention_head_dim` as the number of heads here: 8 heads at every level.
SD15_UNET_CONFIG = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

# AutoencoderKL config of Stable Diffusion 1.5 (downsampling factor 8).
SD15_VAE_CONFIG = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "scaling_factor": 0.18215,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

# CLIPTextConfig of Stable Diffusion 1.5's text encoder (CLIP ViT-L/14's text tower).
SD15_TEXT_ENCODER_CONFIG = {
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 1,
    "projection_dim": 768,
    "vocab_size": 49408,
}

# Scheduler settings of Stable Diffusion 1.5, used with DDIM because DiffEdit needs
# DDIM and its inverse; every pipeline in a run gets the same schedule.
SD15_SCHEDULER_CONFIG = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}

# The tiny components of the test suite: two UNet levels, a VAE that downsamples by 2.
TINY_UNET_CONFIG = {
    "attention_head_dim": [2, 4],
    "block_out_channels": [32, 64],
    "cross_attention_dim": 32,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "in_channels": 4,
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "out_channels": 4,
    "sample_size": 16,
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

TINY_VAE_CONFIG = {
    "block_out_channels": [16, 32],
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "in_channels": 3,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "out_channels": 3,
    "sample_size": 32,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
}

TINY_TEXT_ENCODER_CONFIG = {
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "hidden_size": 32,
    "intermediate_size": 37,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "pad_token_id": 49407,
    "vocab_size": 49408,
}

ARCHITECTURES = {
    "sd15": (SD15_UNET_CONFIG, SD15_VAE_CONFIG, SD15_TEXT_ENCODER_CONFIG),
    "tiny": (TINY_UNET_CONFIG, TINY_VAE_CONFIG, TINY_TEXT_ENCODER_CONFIG),
}


def load_tokenizer(cache_dir: str):
    """Build (once) and load the real CLIP tokenizer in `cache_dir`."""
    small_model_dir = os.path.join(REPO_ROOT, "small_model")
    if small_model_dir not in sys.path:
        sys.path.insert(0, small_model_dir)
    from clip_tokenizer import load_clip_tokenizer

    return load_clip_tokenizer(cache_dir)


def build_components(architecture: str, tokenizer, device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict:
    """Build random-weight UNet, VAE and text encoder of `architecture` ("sd15" or "tiny") plus a DDIM scheduler.

    Returns the keyword arguments of a Stable Diffusion pipeline constructor,
    without a safety checker.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; choose from {sorted(ARCHITECTURES)}.")
    unet_config, vae_config, text_config = ARCHITECTURES[architecture]
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**unet_config)
    vae = AutoencoderKL(**vae_config)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
    models = {"unet": unet, "vae": vae, "text_encoder": text_encoder}
    for name, model in models.items():
        # Cast only when needed: diffusers warns about every explicit cast of a UNet or VAE.
        model.to(device)
        if dtype != torch.float32:
            model.to(dtype)
        model.eval()
    return {
        **models,
        "tokenizer": tokenizer,
        "scheduler": DDIMScheduler(**SD15_SCHEDULER_CONFIG),
        "safety_checker": None,
        "feature_extractor": None,
    }
