"""Train the small DeltaDeno text-to-image latent diffusion model from scratch on CPU.

The model is a standard diffusers Stable Diffusion folder with small
components: an AutoencoderKL with 2x downsampling (32x32 RGB images to
16x16x4 latents), a 2-layer CLIPTextModel of width 48 over the real CLIP
vocabulary, and a UNet2DConditionModel with cross-attention at its coarsest
level (4x4) only. Training data are crops of scikit-image texture photos,
about half of them with a painted hole, scratch or stain (see data.py).

Stages, all counted in optimizer steps so that a run is deterministic given
its seed and thread count (tests/test_training.py checks two short runs):
1. train the VAE on the crops and measure its PSNR on held-out crops,
2. set the VAE `scaling_factor` so that training latents have unit std,
   then encode every crop once,
3. train the UNet and the text encoder jointly on epsilon prediction,
   with 10 % caption dropout for classifier-free guidance and an EMA copy
   of both,
4. save the EMA weights as a StableDiffusionPipeline folder in float16; the
   configs make both diffusers and transformers load them as float32.

Usage: `python small_model/train.py [--out small_model/deltadeno-small] [--seed 0]`.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import data  # noqa: E402
from clip_tokenizer import load_clip_tokenizer  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))

# Stable Diffusion 1.x noise schedule, so that pipeline defaults carry over.
SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join(HERE, "deltadeno-small"), help="output model folder")
    parser.add_argument("--summary", default=os.path.join(HERE, "training_summary.json"), help="JSON file for settings, losses and timings")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--num-crops", type=int, default=6000, help="training crops, cycled over the three textures")
    parser.add_argument("--vae-steps", type=int, default=600)
    parser.add_argument("--vae-batch", type=int, default=32)
    parser.add_argument("--vae-lr", type=float, default=1e-3)
    parser.add_argument("--unet-steps", type=int, default=3500)
    parser.add_argument("--unet-batch", type=int, default=64)
    parser.add_argument("--unet-lr", type=float, default=1e-3)
    parser.add_argument("--caption-dropout", type=float, default=0.1, help="fraction of captions replaced by the empty string")
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--log-every", type=int, default=50, help="steps between printed mean losses")
    return parser.parse_args()


def build_vae():
    from diffusers import AutoencoderKL

    # Two encoder blocks: only the first downsamples, so vae_scale_factor is 2.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=data.CROP_SIZE,
    )


def build_text_encoder(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=48,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def build_unet(cross_attention_dim: int, latent_size: int):
    from diffusers import UNet2DConditionModel

    # Resolutions 16, 8, 4, with cross-attention (and the mid block) only at
    # 4x4. A training step at batch 64 on one CPU thread took 0.37 s, against
    # 0.56 s with cross-attention also at 8x8.
    return UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 48, 64),
        layers_per_block=1,
        attention_head_dim=8,
        cross_attention_dim=cross_attention_dim,
        norm_num_groups=16,
    )


def count_parameters(module: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warmup, then cosine decay to 10 % of the peak learning rate."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """Convert (N, H, W, 3) images in [0, 1] to (N, 3, H, W) tensors in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous() * 2.0 - 1.0


def psnr(reference: torch.Tensor, reconstruction: torch.Tensor) -> float:
    """Return the mean PSNR in dB of image pairs in [-1, 1], measured on the [0, 1] scale."""
    mse = ((reference - reconstruction) / 2).clamp(-1, 1).pow(2).flatten(1).mean(1)
    return float((10 * torch.log10(1.0 / mse)).mean())


def train_vae(vae, images: torch.Tensor, args, generator: torch.Generator, log: list) -> None:
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    vae.train()
    running = []
    start = time.time()
    for step in range(args.vae_steps):
        for group in optimizer.param_groups:
            group["lr"] = args.vae_lr * lr_factor(step, args.vae_steps, warmup=50)
        batch = images[torch.randint(0, len(images), (args.vae_batch,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        reconstruction = vae.decode(latents).sample
        reconstruction_loss = F.mse_loss(reconstruction, batch) + 0.1 * F.l1_loss(reconstruction, batch)
        # A weak KL term keeps the latent scale bounded without blurring the reconstructions.
        kl_loss = posterior.kl().mean() / posterior.mean[0].numel()
        loss = reconstruction_loss + 1e-4 * kl_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        running.append(reconstruction_loss.item())
        if (step + 1) % args.log_every == 0 or step + 1 == args.vae_steps:
            mean_loss = float(np.mean(running))
            running = []
            print(f"vae step {step + 1}/{args.vae_steps} recon_loss {mean_loss:.5f} kl {kl_loss.item():.3f} ({time.time() - start:.0f} s)", flush=True)
            log.append({"step": step + 1, "recon_loss": mean_loss, "kl": kl_loss.item()})
    vae.eval()


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Return the posterior means of `images`, unscaled."""
    chunks = [vae.encode(images[i : i + batch_size]).latent_dist.mean for i in range(0, len(images), batch_size)]
    return torch.cat(chunks)


@torch.no_grad()
def update_ema(ema_model: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for ema_parameter, parameter in zip(ema_model.parameters(), model.parameters()):
        ema_parameter.lerp_(parameter, 1.0 - decay)


def train_unet(unet, text_encoder, latents, caption_ids, unique_input_ids, empty_id, args, generator, log):
    """Train the UNet and text encoder jointly; return their EMA copies."""
    from diffusers import DDPMScheduler

    noise_scheduler = DDPMScheduler(**SCHEDULE)
    ema_unet = copy.deepcopy(unet).eval().requires_grad_(False)
    ema_text_encoder = copy.deepcopy(text_encoder).eval().requires_grad_(False)
    parameters = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=args.unet_lr, weight_decay=0.0)
    unet.train()
    text_encoder.train()
    running = []
    start = time.time()
    for step in range(args.unet_steps):
        for group in optimizer.param_groups:
            group["lr"] = args.unet_lr * lr_factor(step, args.unet_steps, warmup=100)
        indices = torch.randint(0, len(latents), (args.unet_batch,), generator=generator)
        batch_latents = latents[indices]
        batch_caption_ids = caption_ids[indices].clone()
        dropped = torch.rand(args.unet_batch, generator=generator) < args.caption_dropout
        batch_caption_ids[dropped] = empty_id

        # Only a dozen distinct captions exist, so encode each once per step
        # and gather: (num_captions, 77, hidden) -> (batch, 77, hidden).
        # Gather with index_select, because the backward pass of `caption_embeds[ids]`
        # (index_put_ with accumulate) gave different text-encoder gradients
        # from run to run with 2 threads (torch 2.13.0, CPU).
        caption_embeds = text_encoder(unique_input_ids)[0]
        encoder_hidden_states = caption_embeds.index_select(0, batch_caption_ids)

        noise = torch.randn(batch_latents.shape, generator=generator)
        timesteps = torch.randint(0, SCHEDULE["num_train_timesteps"], (args.unet_batch,), generator=generator)
        noisy_latents = noise_scheduler.add_noise(batch_latents, noise, timesteps)
        noise_pred = unet(noisy_latents, timesteps, encoder_hidden_states).sample
        loss = F.mse_loss(noise_pred, noise)

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        update_ema(ema_unet, unet, args.ema_decay)
        update_ema(ema_text_encoder, text_encoder, args.ema_decay)

        running.append(loss.item())
        if (step + 1) % args.log_every == 0 or step + 1 == args.unet_steps:
            mean_loss = float(np.mean(running))
            running = []
            print(f"unet step {step + 1}/{args.unet_steps} loss {mean_loss:.5f} ({time.time() - start:.0f} s)", flush=True)
            log.append({"step": step + 1, "loss": mean_loss})
    return ema_unet, ema_text_encoder


def save_pipeline(out_dir, vae, text_encoder, tokenizer, unet) -> dict:
    """Save a float16 StableDiffusionPipeline folder that loads as float32; return file sizes in bytes."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    scheduler = DDIMScheduler(**SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipeline = StableDiffusionPipeline(
        vae=vae.half(),
        text_encoder=text_encoder.half(),
        tokenizer=tokenizer,
        unet=unet.half(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(out_dir, safe_serialization=True)

    # diffusers 0.42.1 loads float16 weights as float32 unless torch_dtype is
    # given, but transformers 5.25 loads the dtype recorded in config.json, so
    # record float32 there. The weights stay float16 on disk to keep the
    # folder small.
    config_path = os.path.join(out_dir, "text_encoder", "config.json")
    with open(config_path, encoding="utf-8") as handle:
        config = json.load(handle)
    config["dtype"] = "float32"
    config.pop("torch_dtype", None)
    with open(config_path, "w", encoding="utf-8") as handle:
        json.dump(config, handle, indent=2, sort_keys=True)
        handle.write("\n")

    sizes = {}
    for root, _, files in os.walk(out_dir):
        for name in files:
            if name.endswith(".safetensors"):
                path = os.path.join(root, name)
                sizes[os.path.relpath(path, out_dir)] = os.path.getsize(path)
    return sizes


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    wall_start = time.time()
    summary = {"settings": vars(args), "vae_log": [], "unet_log": []}

    # 1. Data and VAE.
    training_set = data.make_training_set(args.num_crops, args.seed)
    images = to_tensor(training_set["images"])
    heldout = to_tensor(np.concatenate([data.heldout_crops(texture) for texture in data.TEXTURES]))
    vae = build_vae()
    print(f"training crops {len(images)}, held-out crops {len(heldout)}", flush=True)
    print(f"vae parameters {count_parameters(vae)}", flush=True)
    train_vae(vae, images, args, generator, summary["vae_log"])
    with torch.no_grad():
        heldout_reconstruction = vae.decode(encode_latents(vae, heldout)).sample
    summary["vae_heldout_psnr_db"] = psnr(heldout, heldout_reconstruction)
    print(f"vae held-out PSNR {summary['vae_heldout_psnr_db']:.2f} dB", flush=True)

    # 2. Latent scale and cached latents, (N, 4, 16, 16).
    latents = encode_latents(vae, images)
    scaling_factor = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scaling_factor)
    latents = latents * scaling_factor
    summary["vae_scaling_factor"] = scaling_factor
    print(f"vae scaling_factor {scaling_factor:.4f} (latent std before scaling {1 / scaling_factor:.4f})", flush=True)

    # 3. Text encoder and UNet.
    tokenizer = load_clip_tokenizer(tempfile.mkdtemp(prefix="clip_tokenizer_"))
    unique_captions = sorted(set(training_set["captions"])) + [""]
    caption_index = {text: index for index, text in enumerate(unique_captions)}
    caption_ids = torch.tensor([caption_index[text] for text in training_set["captions"]])
    unique_input_ids = tokenizer(
        unique_captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    text_encoder = build_text_encoder(tokenizer)
    vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    unet = build_unet(text_encoder.config.hidden_size, data.CROP_SIZE // vae_scale_factor)
    print(f"text encoder parameters {count_parameters(text_encoder)}, unet parameters {count_parameters(unet)}", flush=True)
    print(f"captions: {unique_captions}", flush=True)
    ema_unet, ema_text_encoder = train_unet(
        unet, text_encoder, latents, caption_ids, unique_input_ids, caption_index[""], args, generator, summary["unet_log"]
    )

    # 4. Save.
    sizes = save_pipeline(args.out, vae, ema_text_encoder, tokenizer, ema_unet)
    summary["safetensors_bytes"] = sizes
    summary["safetensors_total_bytes"] = sum(sizes.values())
    summary["parameters"] = {
        "vae": count_parameters(vae),
        "text_encoder": count_parameters(ema_text_encoder),
        "unet": count_parameters(ema_unet),
    }
    summary["wall_seconds"] = time.time() - wall_start
    with open(args.summary, "w", encoding="utf-8") as handle:
        json.dump(summary, handle, indent=2)
        handle.write("\n")
    print(f"saved {args.out}: {summary['safetensors_total_bytes']} bytes of safetensors, wall time {summary['wall_seconds']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
