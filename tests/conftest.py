"""Shared fixtures: tiny Stable Diffusion components built from configs, the real CLIP tokenizer built offline."""

from __future__ import annotations

import os
import sys

import numpy as np
import PIL.Image
import pytest
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (REPO_ROOT, os.path.join(REPO_ROOT, "small_model")):
    if path not in sys.path:
        sys.path.insert(0, path)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

from clip_tokenizer import load_clip_tokenizer  # noqa: E402

from bench.components import TINY_TEXT_ENCODER_CONFIG, TINY_UNET_CONFIG, TINY_VAE_CONFIG  # noqa: E402

SMALL_MODEL_DIR = os.path.join(REPO_ROOT, "small_model", "deltadeno-small")


@pytest.fixture(scope="session")
def installed_site(tmp_path_factory) -> str:
    """Install this repository with `pip install --target` once; return the target folder."""
    import subprocess

    target = tmp_path_factory.mktemp("site")
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--target",
         str(target), REPO_ROOT],
        capture_output=True,
        text=True,
    )
    assert install.returncode == 0, install.stderr
    return str(target)


@pytest.fixture(scope="session")
def clip_tokenizer(tmp_path_factory):
    return load_clip_tokenizer(str(tmp_path_factory.mktemp("clip_tokenizer")))


def make_tiny_components(tokenizer, prediction_type: str = "epsilon", scheduler_name: str = "ddim") -> dict:
    """Build tiny random SD components from the configs the benchmark's `--tiny` run uses too.

    The VAE downsamples by 2, so vae_scale_factor is 2.
    """
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerDiscreteScheduler,
        PNDMScheduler,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**TINY_UNET_CONFIG)
    torch.manual_seed(0)
    vae = AutoencoderKL(**TINY_VAE_CONFIG)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_TEXT_ENCODER_CONFIG)).eval()
    scheduler_config = dict(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
    )
    scheduler_class = {
        "ddim": DDIMScheduler,
        "dpm": DPMSolverMultistepScheduler,
        "euler": EulerDiscreteScheduler,
        "pndm": PNDMScheduler,
    }[scheduler_name]
    if scheduler_name == "ddim":
        scheduler_config.update(clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    if scheduler_name == "pndm":
        scheduler_config.update(skip_prk_steps=True, steps_offset=1)
    return {
        "unet": unet.eval(),
        "vae": vae.eval(),
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": scheduler_class(**scheduler_config),
        "safety_checker": None,
        "feature_extractor": None,
    }


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, clip_tokenizer) -> str:
    """A tiny Stable Diffusion folder on disk, for loading routes and the dataset command."""
    from diffusers import StableDiffusionPipeline

    folder = tmp_path_factory.mktemp("tiny_sd")
    pipe = StableDiffusionPipeline(**make_tiny_components(clip_tokenizer), requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return str(folder)


@pytest.fixture
def tiny_components(clip_tokenizer):
    return make_tiny_components(clip_tokenizer)


@pytest.fixture
def tiny_pipe(tiny_components):
    from pipeline_deltadeno import DeltaDenoPipeline

    pipe = DeltaDenoPipeline(**tiny_components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def textured_image(seed: int = 0, size: tuple[int, int] = (32, 32)) -> PIL.Image.Image:
    """A smooth random RGB image (height, width) = size, deterministic per seed."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(40, 215, size=(size[0] // 4 + 1, size[1] // 4 + 1, 3)).astype(np.uint8)
    image = PIL.Image.fromarray(coarse).resize((size[1], size[0]), PIL.Image.BICUBIC)
    return image


@pytest.fixture
def good_image():
    return textured_image(0)


def default_call_kwargs(**overrides) -> dict:
    kwargs = dict(
        prompt="a photo of a bottle",
        anomaly_prompt="a photo of a bottle with a crack",
        num_inference_steps=6,
        strength=0.8,
        guidance_scale=6.0,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    )
    kwargs.update(overrides)
    return kwargs
