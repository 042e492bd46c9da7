"""DeltaDeno: zero-shot localized defect generation with a pretrained Stable Diffusion model.

Given a defect-free image and a prompt pair that differs only by the defect
words ("a photo of a bottle" / "a photo of a bottle with a crack"), the
pipeline paints a defect into the image and returns a pixel mask of it. No
training and no defect samples are needed.

The method, as `DeltaDenoPipeline.__call__` runs it:
1. align the two prompts' tokens; unmatched anomaly-prompt tokens are the anomaly tokens;
2. refine the anomaly embedding: shared rows copied from the normal prompt, anomaly rows scaled;
3. noise the image latent to the first timestep chosen by `strength`;
4. phase 1: one UNet call per step on [negative, normal, anomaly] accumulates |eps_a - eps_n|
   into a localization map while the latent follows the anomaly branch;
5. threshold the map into a defect mask;
6. phase 2: masked latent inpainting on [negative, anomaly], background reset to the noised input;
7. during phase 2, cross-attention of the anomaly tokens is biased towards the mask;
8. decode and paste the input pixels back outside a feathered mask.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import shutil
import sys
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, StableDiffusionImg2ImgPipeline, UNet2DConditionModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import BaseOutput, logging
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPImageProcessor, CLIPTextModel, CLIPTokenizer

# diffusers loads this file as a custom pipeline inside a package, which needs the
# relative import. A flat install or a script next to the file needs the absolute one.
if __package__:
    from .attention_processors import (
        AnomalyAttentionState,
        DeltaDenoAttnProcessor,
        cross_attention_processor_names,
        unsupported_processor_error,
    )
else:
    from attention_processors import (
        AnomalyAttentionState,
        DeltaDenoAttnProcessor,
        cross_attention_processor_names,
        unsupported_processor_error,
    )

logger = logging.get_logger(__name__)

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from diffusers import DiffusionPipeline
        >>> from diffusers.utils import load_image

        >>> pipe = DiffusionPipeline.from_pretrained(
        ...     "stable-diffusion-v1-5/stable-diffusion-v1-5",
        ...     custom_pipeline="path/to/pipeline_deltadeno.py",
        ...     trust_remote_code=True,
        ...     dtype=torch.float16,
        ... ).to("cuda")
        >>> image = load_image("bottle_good.png").resize((512, 512))
        >>> result = pipe(
        ...     image=image,
        ...     prompt="a photo of a bottle",
        ...     anomaly_prompt="a photo of a bottle with a crack",
        ...     generator=torch.Generator("cuda").manual_seed(0),
        ... )
        >>> result.images[0].save("bottle_crack.png")
        >>> result.masks[0].save("bottle_crack_mask.png")
        ```
"""

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
THRESHOLD_METHODS = ("quantile", "otsu", "absolute")
END_TOKEN_SOURCES = ("anomaly", "normal")


@dataclass
class DeltaDenoPipelineOutput(BaseOutput):
    """Output of `DeltaDenoPipeline`.

    Args:
        images: generated images, one per input image and `num_images_per_prompt`: a list of PIL
            images, a `(batch, height, width, 3)` array in [0, 1], a `(batch, 3, height, width)`
            tensor in [0, 1], or latents for `output_type="latent"`.
        masks: binary defect masks at image resolution in the container type of `images`:
            PIL "L" images with values 0/255, a `(batch, height, width)` float array of 0/1, or a
            `(batch, 1, height, width)` float tensor of 0/1; at latent resolution for "latent".
        localization_maps: `(batch, height, width)` float maps in [0, 1] (numpy for "pil" and
            "np", torch otherwise) accumulated in phase 1; None when `mask_image` was given.
        mask_change: per image, the mean absolute pixel change inside the mask in [0, 1] units
            (0.0 for an empty mask, None for "latent"). Low values mean no visible defect appeared.
        empty_masks: per image, True when no defect region was found (the output then equals
            the input). Such images should not be used as defect samples.
        anomaly_tokens: per image, the anomaly-prompt tokens that the alignment marked as anomalous.
        nsfw_content_detected: the safety checker's flags, or None without a safety checker.
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    masks: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    localization_maps: np.ndarray | torch.Tensor | None
    mask_change: list[float] | None
    empty_masks: list[bool]
    anomaly_tokens: list[list[str]]
    nsfw_content_detected: list[bool] | None


# ----------------------------------------------------------------------------
# Prompt alignment


@dataclass
class PromptAlignment:
    """Token alignment of one prompt pair; positions index the encoder's sequence, start token at 0.

    Attributes:
        pairs: matched `(normal_position, anomaly_position)` pairs, the start token included.
        anomaly_positions: anomaly-prompt positions without a match: the anomaly tokens.
        normal_end, anomaly_end: positions of each prompt's end-of-text token.
        anomaly_tokens: the anomaly tokens as tokenizer strings, e.g. ["with</w>", "crack</w>"].
    """

    pairs: list[tuple[int, int]]
    anomaly_positions: list[int]
    normal_end: int
    anomaly_end: int
    anomaly_tokens: list[str]


def prompt_token_ids(tokenizer, prompt: str) -> list[int]:
    """Return the prompt's content token ids (no start, end or padding), truncated like the encoder."""
    ids = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids
    if ids and ids[0] == tokenizer.bos_token_id:
        ids = ids[1:]
    if ids and ids[-1] == tokenizer.eos_token_id:
        ids = ids[:-1]
    return ids


def align_prompt_tokens(normal_ids: list[int], anomaly_ids: list[int]) -> tuple[list[tuple[int, int]], list[int]]:
    """Align two content-token sequences by their longest matching blocks.

    Returns the matched `(normal_index, anomaly_index)` pairs and the unmatched
    anomaly indices, both as indices into the content sequences (position 0 is
    the first token after the start token).
    """
    matcher = difflib.SequenceMatcher(None, normal_ids, anomaly_ids, autojunk=False)
    pairs = []
    for block in matcher.get_matching_blocks():
        pairs.extend((block.a + k, block.b + k) for k in range(block.size))
    matched = {anomaly_index for _, anomaly_index in pairs}
    unmatched = [index for index in range(len(anomaly_ids)) if index not in matched]
    return pairs, unmatched


# ----------------------------------------------------------------------------
# Localization map to mask, all at latent resolution on the map's device.


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Blur `(batch, 1, h, w)` maps with a separable Gaussian of `sigma` pixels (reflect padding)."""
    if sigma <= 0:
        return maps
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, device=maps.device, dtype=maps.dtype)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    height, width = maps.shape[-2:]
    # Reflect padding needs the pad smaller than the side; fall back to replicate on tiny maps.
    mode = "reflect" if radius < min(height, width) else "replicate"
    padded = F.pad(maps, (radius, radius, 0, 0), mode=mode)
    maps = F.conv2d(padded, kernel.view(1, 1, 1, -1))
    padded = F.pad(maps, (0, 0, radius, radius), mode=mode)
    return F.conv2d(padded, kernel.view(1, 1, -1, 1))


def otsu_threshold(values: torch.Tensor, bins: int = 256) -> float:
    """Return Otsu's threshold of 1-D values in [0, 1]."""
    histogram = torch.histc(values.float(), bins=bins, min=0.0, max=1.0)
    probabilities = histogram / histogram.sum().clamp_min(1)
    centers = (torch.arange(bins, device=values.device, dtype=torch.float32) + 0.5) / bins
    weight_low = torch.cumsum(probabilities, 0)
    mean_low = torch.cumsum(probabilities * centers, 0)
    total_mean = mean_low[-1]
    between = (total_mean * weight_low - mean_low) ** 2 / (weight_low * (1 - weight_low)).clamp_min(1e-12)
    return float(centers[int(torch.argmax(between))])


def connected_components(mask: torch.Tensor) -> torch.Tensor:
    """Label the 8-connected components of a `(h, w)` bool mask; 0 is background, labels are arbitrary."""
    height, width = mask.shape
    labels = torch.arange(1, height * width + 1, device=mask.device, dtype=torch.float32).view(1, 1, height, width)
    labels = labels * mask
    # Each pass spreads the largest label one pixel; a component of diameter d converges in d passes.
    for _ in range(height * width):
        spread = F.max_pool2d(labels, 3, stride=1, padding=1) * mask
        if torch.equal(spread, labels):
            break
        labels = spread
    return labels[0, 0].long()


def keep_strongest_components(mask: torch.Tensor, strength: torch.Tensor, max_components: int) -> torch.Tensor:
    """Keep the `max_components` components of a `(h, w)` bool mask with the largest summed strength."""
    labels = connected_components(mask)
    mass = torch.zeros(mask.numel() + 1, device=mask.device, dtype=torch.float32)
    mass.scatter_add_(0, labels.flatten(), strength.float().flatten())
    mass[0] = 0.0  # background
    component_count = int((mass > 0).sum())
    if component_count <= max_components:
        return mask
    keep = torch.topk(mass, max_components).indices
    return torch.isin(labels, keep)


def top_fraction(values: torch.Tensor, allowed: torch.Tensor, count: int) -> torch.Tensor:
    """Return a bool mask of the `count` largest values among the allowed pixels."""
    scores = torch.where(allowed, values, torch.full_like(values, -float("inf")))
    count = int(min(count, int(allowed.sum())))
    selected = torch.zeros_like(allowed)
    if count > 0:
        selected.view(-1)[torch.topk(scores.view(-1), count).indices] = True
    return selected


def localization_map_to_mask(
    localization_map: torch.Tensor,
    object_mask: torch.Tensor | None,
    threshold_method: str,
    threshold: float,
    min_area_fraction: float,
    max_area_fraction: float,
    max_components: int,
    dilation: int,
    blur_sigma: float,
) -> tuple[torch.Tensor, torch.Tensor, list[bool]]:
    """Turn accumulated `(batch, 1, h, w)` maps into binary masks, each image on its own.

    Returns the binary masks `(batch, 1, h, w)` as float 0/1, the smoothed maps
    normalized to [0, 1] per image, and per image whether the mask is empty.
    A map without contrast (max equal to min inside the object) gives an empty mask.
    """
    maps = gaussian_blur(torch.nan_to_num(localization_map.float()), blur_sigma)
    batch, _, height, width = maps.shape
    allowed_all = (
        object_mask.bool() if object_mask is not None else torch.ones_like(maps, dtype=torch.bool)
    )
    masks = torch.zeros_like(maps, dtype=torch.bool)
    normalized = torch.zeros_like(maps)
    empty = []
    for index in range(batch):
        values, allowed = maps[index, 0], allowed_all[index, 0]
        low, high = values[allowed].min(), values[allowed].max()
        contrast = float(high - low)
        if not math.isfinite(contrast) or contrast <= 1e-8 * max(float(high.abs()), 1e-12):
            normalized[index, 0] = 0.0
            empty.append(True)
            continue
        values = ((values - low) / (high - low)).clamp(0, 1) * allowed
        normalized[index, 0] = values

        if threshold_method == "quantile":
            cutoff = float(torch.quantile(values[allowed], threshold))
            mask = (values >= cutoff) & allowed
        elif threshold_method == "otsu":
            mask = (values > otsu_threshold(values[allowed])) & allowed
        else:
            mask = (values >= threshold) & allowed

        # Area limits are fractions of the whole latent image.
        area = int(mask.sum())
        max_area = max(1, math.floor(max_area_fraction * height * width))
        min_area = math.ceil(min_area_fraction * height * width)
        if area > max_area:
            mask = top_fraction(values, mask, max_area)
        elif area < min_area:
            mask = top_fraction(values, allowed, min_area)

        if max_components > 0 and mask.any():
            mask = keep_strongest_components(mask, values, max_components)
        if dilation > 0 and mask.any():
            grown = F.max_pool2d(mask[None, None].float(), 2 * dilation + 1, stride=1, padding=dilation)
            mask = grown[0, 0].bool() & allowed
        masks[index, 0] = mask
        empty.append(not bool(mask.any()))
    return masks.float(), normalized, empty


# ----------------------------------------------------------------------------
# Input conversion


def _pil_to_array(image: PIL.Image.Image) -> np.ndarray:
    """Convert any PIL mode to a float32 `(h, w, 3)` RGB array in [0, 1]."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image).astype(np.float32)
        scale = 65535.0 if image.mode.startswith("I;16") or array.max(initial=0) > 255 else 255.0
        if image.mode == "F" and array.max(initial=0) <= 1.0:
            scale = 1.0
        array = np.clip(array / scale, 0.0, 1.0)
        return np.repeat(array[..., None], 3, axis=-1)
    if image.mode != "RGB":
        # Palette, grayscale, CMYK and alpha images: alpha is dropped, colours kept.
        image = image.convert("RGBA").convert("RGB") if image.mode == "P" else image.convert("RGB")
    return np.asarray(image).astype(np.float32) / 255.0


def _array_to_unit_range(array: np.ndarray, argument: str) -> np.ndarray:
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    if array.dtype == np.uint16:
        return array.astype(np.float32) / 65535.0
    if array.dtype == np.bool_:
        return array.astype(np.float32)
    array = array.astype(np.float32)
    if not np.isfinite(array).all():
        raise ValueError(f"`{argument}` contains NaN or inf values; pass finite pixel values.")
    return array


def image_to_tensor(image, argument: str = "image") -> torch.Tensor:
    """Convert one image (PIL, numpy or torch) to a float `(3, h, w)` tensor in [0, 1].

    numpy floats must lie in [0, 1]; uint8 and uint16 arrays are scaled. torch
    tensors follow diffusers' convention: values below 0 mean the [-1, 1] range.
    Grayscale inputs are repeated to three channels and alpha channels dropped.
    """
    if isinstance(image, PIL.Image.Image):
        array = _pil_to_array(image)
        return torch.from_numpy(array).permute(2, 0, 1).contiguous()
    if isinstance(image, np.ndarray):
        array = _array_to_unit_range(image, argument)
        if array.ndim == 2:
            array = array[..., None]
        if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
            raise ValueError(
                f"`{argument}` as a numpy array must have shape (height, width), (height, width, 1|3|4); "
                f"got {image.shape}."
            )
        array = array[..., :3] if array.shape[-1] >= 3 else np.repeat(array, 3, axis=-1)
        tensor = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)
    elif isinstance(image, torch.Tensor):
        tensor = image.detach().float().cpu()
        if tensor.ndim == 2:
            tensor = tensor[None]
        if tensor.ndim != 3 or tensor.shape[0] not in (1, 3, 4):
            raise ValueError(
                f"`{argument}` as a tensor must have shape (channels, height, width) with 1, 3 or 4 channels; "
                f"got {tuple(image.shape)}."
            )
        if not torch.isfinite(tensor).all():
            raise ValueError(f"`{argument}` contains NaN or inf values; pass finite pixel values.")
        tensor = tensor[:3] if tensor.shape[0] >= 3 else tensor.repeat(3, 1, 1)
        if tensor.min() < 0:
            tensor = (tensor + 1) / 2
    else:
        raise TypeError(
            f"`{argument}` must be a PIL image, a numpy array or a torch tensor, or a list of them; "
            f"got {type(image).__name__}."
        )
    if tensor.min() < 0 or tensor.max() > 1:
        raise ValueError(
            f"`{argument}` values must lie in [0, 1] (or [-1, 1] for tensors, 0-255 for uint8); "
            f"got [{float(tensor.min()):.3g}, {float(tensor.max()):.3g}]."
        )
    return tensor.float()


def mask_to_tensor(mask, argument: str) -> torch.Tensor:
    """Convert one mask (PIL, numpy or torch) to a bool `(h, w)` tensor; values above half are in."""
    if isinstance(mask, PIL.Image.Image):
        array = np.asarray(mask.convert("L")).astype(np.float32) / 255.0
    elif isinstance(mask, np.ndarray):
        array = _array_to_unit_range(mask, argument)
        if array.ndim == 3 and array.shape[-1] in (1, 3, 4):
            array = array[..., 0]
        if array.max(initial=0) > 1.0:
            array = array / 255.0
    elif isinstance(mask, torch.Tensor):
        array = mask.detach().float().cpu().numpy()
        if not np.isfinite(array).all():
            raise ValueError(f"`{argument}` contains NaN or inf values.")
        while array.ndim > 2 and array.shape[0] == 1:
            array = array[0]
    else:
        raise TypeError(
            f"`{argument}` must be a PIL image, a numpy array or a torch tensor, or a list of them; "
            f"got {type(mask).__name__}."
        )
    if array.ndim != 2:
        raise ValueError(f"`{argument}` must be a single-channel (height, width) mask; got shape {array.shape}.")
    return torch.from_numpy(array > 0.5)


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


# ----------------------------------------------------------------------------
# The pipeline


class DeltaDenoPipeline(StableDiffusionImg2ImgPipeline):
    r"""Zero-shot localized defect generation on real images with Stable Diffusion.

    The pipeline reuses Stable Diffusion's components and img2img helpers
    (prompt encoding, LoRA and textual inversion loading, safety checker) and
    adds the DeltaDeno sampling loop. Load it like a community pipeline:

        DiffusionPipeline.from_pretrained(model, custom_pipeline="path/to/pipeline_deltadeno.py",
                                          trust_remote_code=True)

    or, after `pip install`, `DeltaDenoPipeline.from_pretrained(model)` and
    `DeltaDenoPipeline.from_pipe(stable_diffusion_pipeline)`.

    Args:
        vae: the Stable Diffusion VAE.
        text_encoder: the CLIP text encoder.
        tokenizer: the CLIP tokenizer; it also aligns the prompt pair.
        unet: the conditional UNet (epsilon or v-prediction).
        scheduler: any diffusers scheduler with `add_noise`.
        safety_checker: optional NSFW checker; None disables it.
        feature_extractor: the safety checker's image processor; None without a checker.
        requires_safety_checker: warn when the checker is missing.
    """

    model_cpu_offload_seq = "text_encoder->unet->vae"
    _optional_components = ["safety_checker", "feature_extractor"]
    _exclude_from_cpu_offload = ["safety_checker"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds", "anomaly_prompt_embeds"]

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        safety_checker: StableDiffusionSafetyChecker | None = None,
        feature_extractor: CLIPImageProcessor | None = None,
        requires_safety_checker: bool = False,
    ):
        super(StableDiffusionImg2ImgPipeline, self).__init__()
        if safety_checker is not None and feature_extractor is None:
            raise ValueError(
                "`feature_extractor` is required when `safety_checker` is given; pass both or `safety_checker=None`."
            )
        if safety_checker is None and requires_safety_checker:
            logger.warning(
                "DeltaDenoPipeline runs without a safety checker; keep one for public-facing services."
            )
        self.register_modules(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=safety_checker,
            feature_extractor=feature_extractor,
        )
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1) if getattr(self, "vae", None) else 8
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        self.register_to_config(requires_safety_checker=requires_safety_checker)

    # ------------------------------------------------------------------
    # Saving as a Hub-ready folder

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs):
        """Save the pipeline with both .py files, so `DiffusionPipeline.from_pretrained(folder,
        trust_remote_code=True)` loads it as a DeltaDeno pipeline."""
        super().save_pretrained(save_directory, *args, **kwargs)
        attention_file = sys.modules[DeltaDenoAttnProcessor.__module__].__file__
        for source in (os.path.abspath(__file__), attention_file):
            shutil.copyfile(source, os.path.join(save_directory, os.path.basename(source)))
        index_path = os.path.join(save_directory, "model_index.json")
        with open(index_path, encoding="utf-8") as handle:
            index = json.load(handle)
        index["_class_name"] = ["pipeline_deltadeno", type(self).__name__]
        temporary_path = index_path + ".tmp"
        with open(temporary_path, "w", encoding="utf-8") as handle:
            json.dump(index, handle, indent=2, sort_keys=True)
            handle.write("\n")
        os.replace(temporary_path, index_path)

    # ------------------------------------------------------------------
    # Inputs

    def check_inputs(
        self,
        images: list[torch.Tensor],
        prompts: list[str],
        anomaly_prompts: list[str],
        negative_prompt,
        strength: float,
        num_inference_steps: int,
        guidance_scale: float,
        attribution_fraction: float,
        has_mask_image: bool,
        output_type: str,
        mask_threshold_method: str,
        mask_threshold: float,
        min_area_fraction: float,
        max_area_fraction: float,
        mask_dilation: int,
        mask_max_components: int,
        mask_blur_sigma: float,
        anomaly_token_weight: float,
        end_token_source: str,
        attention_bias_inside: float,
        attention_bias_outside: float,
        feather_sigma: float,
        num_images_per_prompt: int,
        prompt_embeds: torch.Tensor | None,
        negative_prompt_embeds: torch.Tensor | None,
        anomaly_prompt_embeds: torch.Tensor | None,
        callback_on_step_end_tensor_inputs: list[str],
    ) -> None:
        """Raise a ValueError naming the argument, its value and what is accepted, before any model runs."""
        if not prompts or any(not isinstance(p, str) for p in prompts):
            raise TypeError(f"`prompt` must be a string or a list of strings; got {prompts!r}.")
        if not anomaly_prompts or any(not isinstance(p, str) for p in anomaly_prompts):
            raise TypeError(f"`anomaly_prompt` must be a string or a list of strings; got {anomaly_prompts!r}.")
        for name, values in (("prompt", prompts), ("anomaly_prompt", anomaly_prompts)):
            for value in values:
                if not value.strip():
                    raise ValueError(f"`{name}` must not be empty; got {value!r}.")
        if len(prompts) != len(images) or len(anomaly_prompts) != len(images):
            raise ValueError(
                f"`image`, `prompt` and `anomaly_prompt` must be single items or lists of equal length; got "
                f"{len(images)} images, {len(prompts)} prompts and {len(anomaly_prompts)} anomaly prompts."
            )
        if isinstance(negative_prompt, list) and len(negative_prompt) != len(images):
            raise ValueError(
                f"`negative_prompt` as a list must have one entry per image ({len(images)}); "
                f"got {len(negative_prompt)}."
            )

        sizes = {tuple(image.shape[-2:]) for image in images}
        if len(sizes) > 1:
            raise ValueError(
                f"all images in a call must have the same size; got sizes {sorted(sizes)} (height, width). "
                "Resize them, or pass `height` and `width`."
            )
        height, width = sizes.pop()
        multiple = self.vae_scale_factor
        if height % multiple or width % multiple:
            raise ValueError(
                f"image size {width}x{height} (width x height) is not a multiple of the VAE's scale factor "
                f"{multiple}; pass `height={height // multiple * multiple or multiple}`, "
                f"`width={width // multiple * multiple or multiple}` to resize, or resize the images."
            )

        if not 0.0 < strength <= 1.0:
            raise ValueError(f"`strength` must be in (0, 1]; got {strength}.")
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"`num_inference_steps` must be a positive integer; got {num_inference_steps!r}.")
        denoising_steps = min(int(num_inference_steps * strength), num_inference_steps)
        needed = 1 if has_mask_image else 2
        if denoising_steps < needed:
            raise ValueError(
                f"`num_inference_steps` * `strength` = {num_inference_steps} * {strength} gives {denoising_steps} "
                f"denoising steps; DeltaDeno needs at least {needed} (attribution and inpainting). "
                "Raise `num_inference_steps` or `strength`."
            )
        if not math.isfinite(guidance_scale) or guidance_scale < 0:
            raise ValueError(f"`guidance_scale` must be a finite number >= 0; got {guidance_scale}.")
        if not 0.0 < attribution_fraction < 1.0:
            raise ValueError(f"`attribution_fraction` must be in (0, 1); got {attribution_fraction}.")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}; got {output_type!r}.")
        if mask_threshold_method not in THRESHOLD_METHODS:
            raise ValueError(f"`mask_threshold_method` must be one of {THRESHOLD_METHODS}; got {mask_threshold_method!r}.")
        if mask_threshold_method in ("quantile", "absolute") and not 0.0 <= mask_threshold <= 1.0:
            raise ValueError(f"`mask_threshold` must be in [0, 1] for {mask_threshold_method!r}; got {mask_threshold}.")
        if not 0.0 <= min_area_fraction <= max_area_fraction <= 1.0 or max_area_fraction <= 0.0:
            raise ValueError(
                "`min_area_fraction` and `max_area_fraction` must satisfy 0 <= min <= max <= 1 and max > 0; "
                f"got min={min_area_fraction}, max={max_area_fraction}."
            )
        if not isinstance(mask_dilation, int) or mask_dilation < 0:
            raise ValueError(f"`mask_dilation` must be an integer >= 0 (latent pixels); got {mask_dilation!r}.")
        if not isinstance(mask_max_components, int) or mask_max_components < 0:
            raise ValueError(
                f"`mask_max_components` must be an integer >= 0 (0 keeps all); got {mask_max_components!r}."
            )
        for name, value in (("mask_blur_sigma", mask_blur_sigma), ("feather_sigma", feather_sigma)):
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"`{name}` must be a finite number >= 0; got {value}.")
        if not math.isfinite(anomaly_token_weight) or anomaly_token_weight <= 0:
            raise ValueError(f"`anomaly_token_weight` must be a finite number > 0; got {anomaly_token_weight}.")
        if end_token_source not in END_TOKEN_SOURCES:
            raise ValueError(f"`end_token_source` must be one of {END_TOKEN_SOURCES}; got {end_token_source!r}.")
        for name, value in (("attention_bias_inside", attention_bias_inside), ("attention_bias_outside", attention_bias_outside)):
            if not math.isfinite(value):
                raise ValueError(f"`{name}` must be finite; got {value}.")
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"`num_images_per_prompt` must be a positive integer; got {num_images_per_prompt!r}.")
        for name, embeds in (
            ("prompt_embeds", prompt_embeds),
            ("negative_prompt_embeds", negative_prompt_embeds),
            ("anomaly_prompt_embeds", anomaly_prompt_embeds),
        ):
            if embeds is None:
                continue
            if embeds.ndim != 3 or embeds.shape[0] != len(images):
                raise ValueError(
                    f"`{name}` must have shape (batch={len(images)}, tokens, dim); got {tuple(embeds.shape)}."
                )
            if not torch.isfinite(embeds).all():
                raise ValueError(f"`{name}` contains NaN or inf values.")
        if negative_prompt_embeds is not None and negative_prompt is not None:
            raise ValueError("pass either `negative_prompt` or `negative_prompt_embeds`, not both.")
        unknown = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` entries {unknown} are not available; "
                f"choose from {self._callback_tensor_inputs}."
            )

    def prepare_images(self, image, height: int | None, width: int | None) -> list[torch.Tensor]:
        """Convert the `image` argument to a list of `(3, h, w)` tensors in [0, 1], resized if asked."""
        if image is None:
            raise ValueError("`image` is required: pass the defect-free image(s) to paint a defect onto.")
        if isinstance(image, torch.Tensor) and image.ndim == 4:
            items = list(image)
        elif isinstance(image, np.ndarray) and image.ndim == 4:
            items = list(image)
        else:
            items = _as_list(image)
        if not items:
            raise ValueError("`image` is an empty list; pass at least one image.")
        tensors = [image_to_tensor(item, "image") for item in items]
        if (height is None) != (width is None):
            raise ValueError(f"pass both `height` and `width` or neither; got height={height}, width={width}.")
        if height is not None:
            for name, value in (("height", height), ("width", width)):
                if not isinstance(value, int) or value <= 0 or value % self.vae_scale_factor:
                    raise ValueError(
                        f"`{name}` must be a positive multiple of the VAE scale factor {self.vae_scale_factor}; "
                        f"got {value!r}."
                    )
            tensors = [
                F.interpolate(t[None], size=(height, width), mode="bicubic", antialias=True)[0].clamp(0, 1)
                for t in tensors
            ]
        return tensors

    def prepare_masks(self, mask, argument: str, count: int, size: tuple[int, int]) -> torch.Tensor | None:
        """Convert a mask argument to a bool `(count, 1, h, w)` tensor at image size, or None."""
        if mask is None:
            return None
        if isinstance(mask, (torch.Tensor, np.ndarray)) and mask.ndim == 4:
            items = list(mask)
        elif isinstance(mask, (torch.Tensor, np.ndarray)) and mask.ndim == 3 and mask.shape[-1] not in (1, 3, 4):
            items = list(mask)
        else:
            items = _as_list(mask)
        if len(items) == 1 and count > 1:
            items = items * count
        if len(items) != count:
            raise ValueError(f"`{argument}` must be one mask or one per image ({count}); got {len(items)}.")
        tensors = []
        for index, item in enumerate(items):
            tensor = mask_to_tensor(item, argument)
            if tuple(tensor.shape) != tuple(size):
                raise ValueError(
                    f"`{argument}` {index} has size {tensor.shape[1]}x{tensor.shape[0]} (width x height); "
                    f"it must match the image size {size[1]}x{size[0]}."
                )
            if not tensor.any():
                raise ValueError(
                    f"`{argument}` {index} is all zero; it must mark at least one pixel "
                    "(values above half of the range count as inside)."
                )
            tensors.append(tensor)
        return torch.stack(tensors)[:, None]

    def find_anomaly_tokens(self, prompt: str, anomaly_prompt: str) -> PromptAlignment:
        """Align one prompt pair and return its `PromptAlignment`."""
        normal_ids = prompt_token_ids(self.tokenizer, self.maybe_convert_prompt(prompt, self.tokenizer))
        anomaly_ids = prompt_token_ids(self.tokenizer, self.maybe_convert_prompt(anomaly_prompt, self.tokenizer))
        limit = self.tokenizer.model_max_length - 2
        if len(anomaly_ids) >= limit:
            logger.warning(
                "`anomaly_prompt` %r is longer than the text encoder's %d tokens and was truncated.",
                anomaly_prompt,
                self.tokenizer.model_max_length,
            )
        pairs, anomaly_positions = align_prompt_tokens(normal_ids, anomaly_ids)
        if not anomaly_positions:
            detail = "identical to" if normal_ids == anomaly_ids else "adds no tokens to"
            raise ValueError(
                f"`anomaly_prompt` {anomaly_prompt!r} is {detail} `prompt` {prompt!r} within the first "
                f"{self.tokenizer.model_max_length} tokens; the anomaly prompt must add defect words, "
                "e.g. 'a photo of a bottle' and 'a photo of a bottle with a crack'."
            )
        return PromptAlignment(
            pairs=[(0, 0)] + [(n + 1, a + 1) for n, a in pairs],
            anomaly_positions=[a + 1 for a in anomaly_positions],
            normal_end=len(normal_ids) + 1,
            anomaly_end=len(anomaly_ids) + 1,
            anomaly_tokens=self.tokenizer.convert_ids_to_tokens([anomaly_ids[a] for a in anomaly_positions]),
        )

    def refine_anomaly_embeds(
        self,
        normal_embeds: torch.Tensor,
        anomaly_embeds: torch.Tensor,
        alignments: list[PromptAlignment],
        anomaly_token_weight: float,
        end_token_source: str,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Build the refined anomaly embedding and the `(batch, tokens)` anomaly-column mask.

        Shared rows come from the normal prompt so the two branches differ only
        through the anomaly words; anomaly rows are multiplied by the weight.
        """
        refined = anomaly_embeds.clone()
        batch, length, _ = refined.shape
        columns = torch.zeros(batch, length, dtype=torch.bool, device=refined.device)
        for index, alignment in enumerate(alignments):
            normal_rows = torch.tensor([n for n, _ in alignment.pairs], device=refined.device)
            anomaly_rows = torch.tensor([a for _, a in alignment.pairs], device=refined.device)
            refined[index, anomaly_rows] = normal_embeds[index, normal_rows]
            positions = torch.tensor(alignment.anomaly_positions, device=refined.device)
            refined[index, positions] = anomaly_embeds[index, positions] * anomaly_token_weight
            columns[index, positions] = True
            if end_token_source == "normal":
                end_rows = torch.arange(alignment.anomaly_end, length, device=refined.device)
                source_rows = (end_rows - alignment.anomaly_end + alignment.normal_end).clamp(max=length - 1)
                refined[index, end_rows] = normal_embeds[index, source_rows]
        return refined, columns

    # ------------------------------------------------------------------
    # VAE with upcasting where the config sets force_upcast

    def _vae_needs_upcast(self) -> bool:
        return self.vae.dtype == torch.float16 and getattr(self.vae.config, "force_upcast", False)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Encode `(batch, 3, h, w)` pixels in [0, 1] to scaled latents (the posterior mean)."""
        upcast = self._vae_needs_upcast()
        if upcast:
            self.vae.to(dtype=torch.float32)
        pixels = pixels.to(device=self._execution_device, dtype=self.vae.dtype)
        latents = self.vae.encode(pixels * 2 - 1).latent_dist.mean * self.vae.config.scaling_factor
        if upcast:
            self.vae.to(dtype=torch.float16)
        shift = getattr(self.vae.config, "shift_factor", None)
        if shift:
            latents = latents - shift * self.vae.config.scaling_factor
        return latents

    def decode_to_pixels(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode scaled latents to float32 `(batch, 3, h, w)` pixels in [0, 1]."""
        upcast = self._vae_needs_upcast()
        dtype = torch.float32 if upcast else self.vae.dtype
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        latents = latents.to(dtype) / self.vae.config.scaling_factor + shift
        if upcast:
            self.vae.to(dtype=torch.float32)
        pixels = self.vae.decode(latents, return_dict=False)[0]
        if upcast:
            self.vae.to(dtype=torch.float16)
        return (pixels.float() / 2 + 0.5).clamp(0, 1)

    # ------------------------------------------------------------------
    # Properties read by callbacks, as in diffusers' pipelines

    @property
    def attribution_steps(self) -> int:
        return self._attribution_steps

    # ------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        image=None,
        prompt: str | list[str] | None = None,
        anomaly_prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int = 50,
        strength: float = 0.75,
        guidance_scale: float = 7.5,
        attribution_fraction: float = 0.4,
        mask_image=None,
        object_mask=None,
        height: int | None = None,
        width: int | None = None,
        mask_threshold_method: str = "quantile",
        mask_threshold: float = 0.9,
        min_area_fraction: float = 0.0,
        max_area_fraction: float = 0.25,
        mask_dilation: int = 0,
        mask_max_components: int = 1,
        mask_blur_sigma: float = 1.0,
        anomaly_token_weight: float = 1.5,
        end_token_source: str = "anomaly",
        attention_bias_inside: float = 1.0,
        attention_bias_outside: float = -8.0,
        normal_as_negative: bool = False,
        feather_sigma: float | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        anomaly_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        clip_skip: int | None = None,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ):
        r"""Paint a defect into each image and return it with its mask.

        Args:
            image: defect-free image(s): PIL, numpy `(h, w, c)` / `(b, h, w, c)` or torch
                `(c, h, w)` / `(b, c, h, w)`, or a list. Sides must be multiples of
                `pipe.vae_scale_factor` (8 for Stable Diffusion) unless `height`/`width` are given.
                RGBA, grayscale, palette and 16-bit images are converted to RGB.
            prompt: the normal prompt, e.g. "a photo of a bottle"; one or one per image.
            anomaly_prompt: the same prompt with the defect words, e.g. "a photo of a bottle with a
                crack"; one or one per image. Its tokens that do not align with `prompt` are the
                anomaly tokens.
            negative_prompt: the unconditional branch's prompt; empty by default.
            num_inference_steps: scheduler steps for the full schedule (default 50).
            strength: how far the image is noised, in (0, 1]; `strength * num_inference_steps`
                steps are run (default 0.75; 0.7-0.8 worked best in our probe, 0.6 was weak).
            guidance_scale: classifier-free guidance weight; values <= 1 turn guidance off (default 7.5).
            attribution_fraction: share of the denoising steps spent in phase 1 (attribution),
                in (0, 1) (default 0.4; the defect is mostly decided in phase 1).
            mask_image: optional defect mask(s) at image size; phase 1 is skipped and this mask used.
            object_mask: optional mask(s) of the part; the defect is confined to it.
            height, width: resize the images to this size (multiples of `vae_scale_factor`) first.
            mask_threshold_method: "quantile" (keep values above the `mask_threshold` quantile),
                "otsu" (Otsu's threshold) or "absolute" (keep normalized values >= `mask_threshold`).
            mask_threshold: quantile in [0, 1] or absolute level in [0, 1] (default 0.9: the top 10 %).
            min_area_fraction, max_area_fraction: bounds on the mask area as fractions of the image;
                outside them the strongest pixels are taken instead (defaults 0 and 0.25).
            mask_dilation: dilation of the mask in latent pixels (default 0).
            mask_max_components: keep only this many connected components with the largest map mass;
                0 keeps all (default 1: one defect per image).
            mask_blur_sigma: Gaussian smoothing of the map before thresholding, in latent pixels (default 1).
            anomaly_token_weight: factor on the anomaly-token embedding rows, > 0 (default 1.5).
            end_token_source: where the refined anomaly embedding takes its end-of-text and padding
                rows from: "anomaly" (they carry the defect meaning in CLIP's causal encoder) or
                "normal" (default "anomaly").
            attention_bias_inside: logit bias of anomaly tokens inside the mask in phase 2 (default 1.0).
            attention_bias_outside: logit bias of anomaly tokens outside the mask (default -8.0);
                both 0 disables the bias.
            normal_as_negative: in phase 1, use the normal prompt as the guidance's negative branch so
                each step needs two conditions instead of three (cheaper; `negative_prompt` then acts
                only in phase 2).
            feather_sigma: Gaussian feather of the pasting mask in image pixels; None uses
                `vae_scale_factor / 2`. Pixels further than `3 * feather_sigma` from the mask are the
                input's, unchanged.
            num_images_per_prompt: generations per input image, each with its own noise.
            eta: DDIM's eta; other schedulers ignore it.
            generator: torch generator(s) for reproducible noise; a list needs one per generation.
            latents: optional pre-drawn noise `(batch * num_images_per_prompt, c, h, w)` used to noise
                the image latents instead of drawing from `generator`.
            prompt_embeds, negative_prompt_embeds, anomaly_prompt_embeds: precomputed text embeddings
                overriding the encoder's; `prompt` and `anomaly_prompt` are still needed to find the
                anomaly tokens.
            output_type: "pil", "np", "pt" or "latent".
            return_dict: return a `DeltaDenoPipelineOutput` (default) or a tuple of its fields.
            cross_attention_kwargs: passed to the UNet's attention processors (e.g. `{"scale": 0.5}` for LoRA).
            clip_skip: number of final CLIP layers to skip.
            callback_on_step_end: called after every step as `callback(pipe, step, timestep, kwargs)`.
            callback_on_step_end_tensor_inputs: names from `pipe._callback_tensor_inputs` passed to it.

        Returns:
            `DeltaDenoPipelineOutput`, or the tuple (images, masks, localization_maps, mask_change,
            empty_masks, anomaly_tokens, nsfw_content_detected) when `return_dict=False`.
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        callback_on_step_end_tensor_inputs = callback_on_step_end_tensor_inputs or ["latents"]

        # 1. Check and convert inputs, before any model runs
        images = self.prepare_images(image, height, width)
        prompts = _as_list(prompt) if prompt is not None else []
        anomaly_prompts = _as_list(anomaly_prompt) if anomaly_prompt is not None else []
        if len(prompts) == 1 and len(images) > 1:
            prompts = prompts * len(images)
        if len(anomaly_prompts) == 1 and len(images) > 1:
            anomaly_prompts = anomaly_prompts * len(images)
        if prompt is None or anomaly_prompt is None:
            raise ValueError(
                "`prompt` and `anomaly_prompt` are required, also with precomputed embeddings, because the "
                f"anomaly tokens come from aligning them; got prompt={prompt!r}, anomaly_prompt={anomaly_prompt!r}."
            )
        if feather_sigma is None:
            feather_sigma = self.vae_scale_factor / 2
        self.check_inputs(
            images, prompts, anomaly_prompts, negative_prompt, strength, num_inference_steps, guidance_scale,
            attribution_fraction, mask_image is not None, output_type, mask_threshold_method, mask_threshold,
            min_area_fraction, max_area_fraction, mask_dilation, mask_max_components, mask_blur_sigma,
            anomaly_token_weight, end_token_source, attention_bias_inside, attention_bias_outside, feather_sigma,
            num_images_per_prompt, prompt_embeds, negative_prompt_embeds, anomaly_prompt_embeds,
            callback_on_step_end_tensor_inputs,
        )
        image_size = tuple(images[0].shape[-2:])
        user_masks = self.prepare_masks(mask_image, "mask_image", len(images), image_size)
        object_masks = self.prepare_masks(object_mask, "object_mask", len(images), image_size)
        # Read once: the property walks every module of the UNet.
        saved_processors = dict(self.unet.attn_processors)
        error = unsupported_processor_error(saved_processors)
        if error:
            raise ValueError(error)

        self._guidance_scale = guidance_scale
        self._clip_skip = clip_skip
        self._cross_attention_kwargs = cross_attention_kwargs
        self._interrupt = False
        device = self._execution_device
        copies = num_images_per_prompt
        batch = len(images) * copies
        if isinstance(generator, list) and len(generator) != batch:
            raise ValueError(
                f"`generator` as a list must have one generator per generation ({batch} = "
                f"{len(images)} images x {copies} num_images_per_prompt); got {len(generator)}."
            )
        latent_shape = (
            batch,
            self.vae.config.latent_channels,
            image_size[0] // self.vae_scale_factor,
            image_size[1] // self.vae_scale_factor,
        )
        if latents is not None:
            if tuple(latents.shape) != latent_shape:
                raise ValueError(f"`latents` (the noise) must have shape {latent_shape}; got {tuple(latents.shape)}.")
            if not torch.isfinite(latents).all():
                raise ValueError("`latents` contains NaN or inf values.")

        # 2. Align each prompt pair; the anomaly tokens drive attribution and the attention bias
        alignments = [self.find_anomaly_tokens(p, a) for p, a in zip(prompts, anomaly_prompts)]
        alignments = [alignment for alignment in alignments for _ in range(copies)]
        anomaly_tokens = [alignment.anomaly_tokens for alignment in alignments]

        # 3. Encode prompts and refine the anomaly embedding
        lora_scale = cross_attention_kwargs.get("scale", None) if cross_attention_kwargs else None
        do_cfg = guidance_scale > 1.0
        normal_embeds, negative_embeds = self.encode_prompt(
            prompts, device, copies, do_cfg, negative_prompt,
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
            lora_scale=lora_scale, clip_skip=clip_skip,
        )
        anomaly_embeds, _ = self.encode_prompt(
            anomaly_prompts, device, copies, False, None,
            prompt_embeds=anomaly_prompt_embeds, lora_scale=lora_scale, clip_skip=clip_skip,
        )
        anomaly_embeds, anomaly_columns = self.refine_anomaly_embeds(
            normal_embeds, anomaly_embeds, alignments, anomaly_token_weight, end_token_source
        )
        prompt_embeds, negative_prompt_embeds, anomaly_prompt_embeds = normal_embeds, negative_embeds, anomaly_embeds
        embeds_by_name = {
            "prompt_embeds": prompt_embeds,
            "negative_prompt_embeds": negative_prompt_embeds,
            "anomaly_prompt_embeds": anomaly_prompt_embeds,
        }

        # 4. Timesteps of the img2img schedule chosen by strength
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps, _ = self.get_timesteps(num_inference_steps, strength, device)
        self._num_timesteps = len(timesteps)
        if user_masks is None:
            attribution_steps = min(max(1, round(attribution_fraction * len(timesteps))), len(timesteps) - 1)
        else:
            attribution_steps = 0
        self._attribution_steps = attribution_steps

        # 5. Encode the image and noise it to the first timestep; the same noise re-noises the
        # background in phase 2
        pixels = torch.stack(images).repeat_interleave(copies, dim=0)
        image_latents = self.encode_images(pixels).to(prompt_embeds.dtype)
        noise = latents if latents is not None else randn_tensor(
            latent_shape, generator=generator, device=device, dtype=prompt_embeds.dtype
        )
        noise = noise.to(device=device, dtype=prompt_embeds.dtype)
        latents = self.scheduler.add_noise(image_latents, noise, timesteps[:1].repeat(batch))
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)
        latent_size = latent_shape[-2:]
        latent_object_masks = None
        if object_masks is not None:
            # A latent cell belongs to the part when any of its pixels does.
            latent_object_masks = F.adaptive_max_pool2d(object_masks.float(), latent_size).repeat_interleave(copies, 0)
            latent_object_masks = latent_object_masks.to(device)

        state = AnomalyAttentionState()
        cross_names = set(cross_attention_processor_names(self.unet))
        self.unet.set_attn_processor(
            {
                name: DeltaDenoAttnProcessor(state, processor) if name in cross_names else processor
                for name, processor in saved_processors.items()
            }
        )
        localization_map = torch.zeros((batch, 1, *latent_size), device=device, dtype=torch.float32)
        try:
            with self.progress_bar(total=len(timesteps)) as progress_bar:
                # 6. Phase 1: attribution; one UNet call on [negative, normal, anomaly] per step
                if normal_as_negative or not do_cfg:
                    phase1_embeds = torch.cat([prompt_embeds, anomaly_prompt_embeds])
                else:
                    phase1_embeds = torch.cat([negative_prompt_embeds, prompt_embeds, anomaly_prompt_embeds])
                conditions = phase1_embeds.shape[0] // batch
                for step in range(attribution_steps):
                    if self.interrupt:
                        break
                    t = timesteps[step]
                    model_input = self.scheduler.scale_model_input(torch.cat([latents] * conditions), t)
                    noise_pred = self.unet(
                        model_input, t, encoder_hidden_states=phase1_embeds,
                        cross_attention_kwargs=cross_attention_kwargs, return_dict=False,
                    )[0]
                    branches = noise_pred.chunk(conditions)
                    normal_pred, anomaly_pred = branches[-2], branches[-1]
                    # (batch, 1, h, w): where the anomaly words change the prediction, normalized per
                    # image so that every step contributes the same mass.
                    delta = (anomaly_pred.float() - normal_pred.float()).abs().mean(dim=1, keepdim=True)
                    delta = torch.nan_to_num(delta)
                    localization_map += delta / delta.mean(dim=(2, 3), keepdim=True).clamp_min(1e-12)
                    if do_cfg:
                        guide_from = branches[0]
                        noise_pred = guide_from + guidance_scale * (anomaly_pred - guide_from)
                    else:
                        noise_pred = anomaly_pred
                    latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]
                    latents = self._run_callback(
                        callback_on_step_end, callback_on_step_end_tensor_inputs, step, t, latents, embeds_by_name
                    )
                    progress_bar.update()

                # 7. Mask from the localization map, or the caller's mask
                if user_masks is None:
                    mask, normalized_map, empty_masks = localization_map_to_mask(
                        localization_map, latent_object_masks, mask_threshold_method, mask_threshold,
                        min_area_fraction, max_area_fraction, mask_max_components, mask_dilation, mask_blur_sigma,
                    )
                else:
                    mask = F.adaptive_max_pool2d(user_masks.float(), latent_size).repeat_interleave(copies, 0)
                    mask = mask.to(device)
                    if latent_object_masks is not None:
                        mask = mask * latent_object_masks
                    normalized_map = None
                    empty_masks = [not bool(m.any()) for m in mask]
                latent_mask = mask.to(latents.dtype)

                # 8. Phase 2: masked inpainting on [negative, anomaly] with the attention bias
                phase2_embeds = (
                    torch.cat([negative_prompt_embeds, anomaly_prompt_embeds]) if do_cfg else anomaly_prompt_embeds
                )
                conditions = 2 if do_cfg else 1
                state.activate(
                    region=mask,
                    anomaly_columns=anomaly_columns,
                    anomaly_rows=slice((conditions - 1) * batch, conditions * batch),
                    unet_batch_size=conditions * batch,
                    bias_inside=attention_bias_inside,
                    bias_outside=attention_bias_outside,
                )
                for step in range(attribution_steps, len(timesteps)):
                    if self.interrupt:
                        break
                    t = timesteps[step]
                    model_input = self.scheduler.scale_model_input(torch.cat([latents] * conditions), t)
                    noise_pred = self.unet(
                        model_input, t, encoder_hidden_states=phase2_embeds,
                        cross_attention_kwargs=cross_attention_kwargs, return_dict=False,
                    )[0]
                    if do_cfg:
                        negative_pred, anomaly_pred = noise_pred.chunk(2)
                        noise_pred = negative_pred + guidance_scale * (anomaly_pred - negative_pred)
                    latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]
                    # Outside the mask the latent follows the input, noised to the next timestep.
                    if step + 1 < len(timesteps):
                        background = self.scheduler.add_noise(image_latents, noise, timesteps[step + 1 : step + 2])
                    else:
                        background = image_latents
                    latents = latent_mask * latents + (1 - latent_mask) * background
                    latents = self._run_callback(
                        callback_on_step_end, callback_on_step_end_tensor_inputs, step, t, latents, embeds_by_name
                    )
                    progress_bar.update()
        finally:
            state.deactivate()
            self.unet.set_attn_processor(dict(saved_processors))

        # 9. Decode and compose: input pixels outside the feathered mask
        if output_type == "latent":
            self.maybe_free_model_hooks()
            maps = None if normalized_map is None else normalized_map[:, 0]
            result = (latents, mask, maps, None, empty_masks, anomaly_tokens, None)
            return DeltaDenoPipelineOutput(*result) if return_dict else result

        decoded = self.decode_to_pixels(latents)
        pixels = pixels.to(decoded.device)
        pixel_mask = F.interpolate(mask.float(), size=image_size, mode="nearest")
        alpha = torch.maximum(pixel_mask, gaussian_blur(pixel_mask, feather_sigma)) if feather_sigma > 0 else pixel_mask
        composed = torch.where(alpha > 0, alpha * decoded + (1 - alpha) * pixels, pixels)
        inside = pixel_mask.sum(dim=(1, 2, 3)).clamp_min(1) * 3
        mask_change = ((composed - pixels).abs() * pixel_mask).sum(dim=(1, 2, 3)) / inside
        mask_change = [0.0 if empty else float(value) for value, empty in zip(mask_change, empty_masks)]

        composed, nsfw_content_detected = self.run_safety_checker(composed * 2 - 1, device, prompt_embeds.dtype)
        if torch.is_tensor(composed) and composed.min() < 0:
            composed = (composed + 1) / 2

        # 10. Convert to the requested container
        maps = None
        if normalized_map is not None:
            maps = F.interpolate(normalized_map, size=image_size, mode="bilinear", align_corners=False)[:, 0].clamp(0, 1)
        if output_type == "pt":
            output_images, output_masks = composed, pixel_mask
        else:
            output_images = composed.permute(0, 2, 3, 1).cpu().float().numpy()
            output_masks = pixel_mask[:, 0].cpu().numpy()
            maps = None if maps is None else maps.cpu().numpy()
            if output_type == "pil":
                output_images = self.image_processor.numpy_to_pil(output_images)
                output_masks = [PIL.Image.fromarray((m * 255).astype(np.uint8), mode="L") for m in output_masks]
        self.maybe_free_model_hooks()

        result = (output_images, output_masks, maps, mask_change, empty_masks, anomaly_tokens, nsfw_content_detected)
        if not return_dict:
            return result
        return DeltaDenoPipelineOutput(*result)

    def _run_callback(self, callback, tensor_inputs, step, timestep, latents, embeds_by_name) -> torch.Tensor:
        """Call `callback_on_step_end` and return the latents it returns (or the old ones).

        Only `latents` may be replaced by the callback; the prompt embeddings are passed for reading.
        """
        if callback is None:
            return latents
        available = {"latents": latents, **embeds_by_name}
        callback_kwargs = {name: available[name] for name in tensor_inputs}
        outputs = callback(self, step, timestep, callback_kwargs) or {}
        return outputs.get("latents", latents)
