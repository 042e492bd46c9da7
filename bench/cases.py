"""The six timed pipeline configurations: img2img, DiffEdit and four DeltaDeno variants on shared components.

Every pipeline is built from the same UNet, VAE, text encoder and tokenizer
objects, each with its own DDIM scheduler of the same config, and every call
gets the same image, prompts, step count, strength, guidance scale and seed.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable

import numpy as np
import PIL.Image
import torch
from diffusers import (
    DDIMInverseScheduler,
    DDIMScheduler,
    StableDiffusionDiffEditPipeline,
    StableDiffusionImg2ImgPipeline,
)

from bench.components import REPO_ROOT

if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from pipeline_deltadeno import DeltaDenoPipeline  # noqa: E402

PROMPT = "a photo of a bottle"
ANOMALY_PROMPT = "a photo of a bottle with a crack"
GUIDANCE_SCALE = 7.5
SEED = 0
# Share of the image that the caller-supplied mask covers, close to the default
# DeltaDeno mask (the top 10 % of the localization map).
MASK_AREA_FRACTION = 0.1


@dataclass(frozen=True)
class Settings:
    """Settings shared by every timed call."""

    size: int
    steps: int
    strength: float
    device: str
    dtype: torch.dtype


@dataclass(frozen=True)
class PipelineCase:
    """One timed pipeline configuration."""

    key: str
    label: str
    run: Callable[[], object]


def make_image(size: int) -> PIL.Image.Image:
    """Return a smooth random RGB image of `size` x `size`, the same on every run."""
    rng = np.random.default_rng(SEED)
    coarse = rng.uniform(40, 215, size=(size // 4 + 1, size // 4 + 1, 3)).astype(np.uint8)
    return PIL.Image.fromarray(coarse).resize((size, size), PIL.Image.BICUBIC)


def make_defect_mask(size: int) -> PIL.Image.Image:
    """Return a centred square mask ("L", 0/255) covering about `MASK_AREA_FRACTION` of the image."""
    side = max(1, round(size * MASK_AREA_FRACTION**0.5))
    start = (size - side) // 2
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[start : start + side, start : start + side] = 255
    return PIL.Image.fromarray(mask, mode="L")


def _model_components(components: dict) -> dict:
    return {
        name: components[name]
        for name in ("vae", "text_encoder", "tokenizer", "unet", "safety_checker", "feature_extractor")
    }


class PipelineCases:
    """The img2img, DiffEdit and DeltaDeno pipelines on shared components, and the calls to time."""

    def __init__(self, components: dict, settings: Settings):
        self.settings = settings
        scheduler_config = components["scheduler"].config
        shared = _model_components(components)
        self.img2img = StableDiffusionImg2ImgPipeline(
            **shared, scheduler=DDIMScheduler.from_config(scheduler_config), requires_safety_checker=False
        )
        self.diffedit = StableDiffusionDiffEditPipeline(
            **shared,
            scheduler=DDIMScheduler.from_config(scheduler_config),
            inverse_scheduler=DDIMInverseScheduler.from_config(scheduler_config),
            requires_safety_checker=False,
        )
        self.deltadeno = DeltaDenoPipeline(**shared, scheduler=DDIMScheduler.from_config(scheduler_config))
        for pipe in (self.img2img, self.diffedit, self.deltadeno):
            pipe.set_progress_bar_config(disable=True)
        self.image = make_image(settings.size)
        self.defect_mask = make_defect_mask(settings.size)

    def _generator(self) -> torch.Generator:
        return torch.Generator(self.settings.device).manual_seed(SEED)

    def _common(self) -> dict:
        return {
            "num_inference_steps": self.settings.steps,
            "guidance_scale": GUIDANCE_SCALE,
            "generator": self._generator(),
            "output_type": "np",
        }

    def run_img2img(self):
        return self.img2img(
            prompt=ANOMALY_PROMPT, image=self.image, strength=self.settings.strength, **self._common()
        ).images

    def run_diffedit(self):
        # DiffEdit's three stages with its defaults: a mask from 10 noise draws at
        # encode strength 0.5, DDIM inversion of the source prompt, then the masked edit.
        steps = self.settings.steps
        strength = self.settings.strength
        mask = self.diffedit.generate_mask(
            image=self.image,
            source_prompt=PROMPT,
            target_prompt=ANOMALY_PROMPT,
            num_inference_steps=steps,
            guidance_scale=GUIDANCE_SCALE,
            generator=self._generator(),
        )
        inverted = self.diffedit.invert(
            prompt=PROMPT,
            image=self.image,
            num_inference_steps=steps,
            inpaint_strength=strength,
            guidance_scale=GUIDANCE_SCALE,
            generator=self._generator(),
        ).latents
        return self.diffedit(
            prompt=ANOMALY_PROMPT,
            mask_image=mask,
            image_latents=inverted,
            inpaint_strength=strength,
            **self._common(),
        ).images

    def run_deltadeno(self, **overrides):
        return self.deltadeno(
            image=self.image,
            prompt=PROMPT,
            anomaly_prompt=ANOMALY_PROMPT,
            strength=self.settings.strength,
            **self._common(),
            **overrides,
        ).images

    def cases(self) -> list[PipelineCase]:
        """Return the timed configurations. The first, img2img, is the reference of every ratio."""
        return [
            PipelineCase("img2img", "img2img (`StableDiffusionImg2ImgPipeline`)", self.run_img2img),
            PipelineCase(
                "diffedit", "DiffEdit (`StableDiffusionDiffEditPipeline`: mask + inversion + edit)", self.run_diffedit
            ),
            PipelineCase("deltadeno", "DeltaDeno, defaults", self.run_deltadeno),
            PipelineCase(
                "deltadeno_no_bias",
                "DeltaDeno, no attention bias (`attention_bias_inside=0, attention_bias_outside=0`)",
                lambda: self.run_deltadeno(attention_bias_inside=0.0, attention_bias_outside=0.0),
            ),
            PipelineCase(
                "deltadeno_mask_image",
                "DeltaDeno, caller's mask (`mask_image`, no attribution phase)",
                lambda: self.run_deltadeno(mask_image=self.defect_mask),
            ),
            PipelineCase(
                "deltadeno_normal_as_negative",
                "DeltaDeno, `normal_as_negative=True` (two conditions per attribution step)",
                lambda: self.run_deltadeno(normal_as_negative=True),
            ),
        ]
