"""Measure DeltaDeno's claims on the small trained model and its held-out crops.

Every number compares DeltaDeno against a baseline run on the same model,
image, strength and seed, so that a broken step of the method shows up as a
collapse towards the baseline:

- defect rate: the share of cases where the requested defect appears inside the
  returned mask (mean gray level drops by `INTENSITY_MARGIN` for hole and
  scratch, rises by it for stain), against the same measure on a random mask of
  equal area (the DeltaDeno mask rolled by a random offset);
- mask hit: a plain img2img edit with the anomaly prompt, no mask, and the same
  noise; the share of its pixel change that falls inside the DeltaDeno mask,
  divided by the mask's area fraction (1.0 means no better than chance), against
  the same ratio for the rolled mask;
- AUROC: per-pixel AUROC of the localization map against a defect painted into
  the crop (the map comes from the attribution phase only);
- top-10 % mass: the share of localization-map mass in its top 10 % of pixels;
- control: plain img2img with the normal prompt and the same noise, read inside
  the DeltaDeno mask with the defect-rate measure (the defect must come from the
  anomaly prompt, not from reconstruction noise).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from data import DEFECT_KINDS, TEXTURES, caption, heldout_crops, paint_defect

# Mean gray-level change inside the mask, in [0, 1] units, that counts as a defect.
INTENSITY_MARGIN = 0.05
DARK_DEFECTS = ("hole", "scratch")


def gray(images: np.ndarray) -> np.ndarray:
    """Mean over RGB of `(..., 3)` float images."""
    return images.mean(axis=-1)


def defect_visible(kind: str, before: np.ndarray, after: np.ndarray, mask: np.ndarray) -> bool:
    """True when the mean gray level inside `mask` moves in the defect's direction by the margin."""
    if not mask.any():
        return False
    shift = float(gray(after)[mask].mean() - gray(before)[mask].mean())
    return shift <= -INTENSITY_MARGIN if kind in DARK_DEFECTS else shift >= INTENSITY_MARGIN


def rolled_mask(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Move the mask by a random offset, wrapping around, so the shape and area stay equal."""
    height, width = mask.shape
    shift_y = int(rng.integers(height // 4, height - height // 4 + 1))
    shift_x = int(rng.integers(width // 4, width - width // 4 + 1))
    return np.roll(mask, (shift_y, shift_x), axis=(0, 1))


def change_concentration(before: np.ndarray, after: np.ndarray, mask: np.ndarray) -> float:
    """Share of |after - before| inside the mask divided by the mask's area share; 1.0 is chance."""
    change = np.abs(after - before).sum(axis=-1)
    total = float(change.sum())
    if total <= 0 or not mask.any():
        return 0.0
    return float(change[mask].sum() / total) / float(mask.mean())


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve of `scores` for bool `labels` (Mann-Whitney U with tied ranks)."""
    scores = scores.ravel().astype(np.float64)
    labels = labels.ravel().astype(bool)
    positives, negatives = int(labels.sum()), int((~labels).sum())
    if positives == 0 or negatives == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    # Average ranks over ties.
    start = 0
    while start < len(scores):
        end = start
        while end + 1 < len(scores) and sorted_scores[end + 1] == sorted_scores[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def top_mass_share(values: np.ndarray, fraction: float = 0.1) -> float:
    """Share of the total of a non-negative map held by its top `fraction` of pixels."""
    flat = np.sort(values.ravel())[::-1]
    total = float(flat.sum())
    if total <= 0:
        return 0.0
    return float(flat[: max(1, int(round(fraction * len(flat))))].sum() / total)


@dataclass
class KindResult:
    """Per-defect-kind tallies; `summary()` turns them into rates and means."""

    cases: int = 0
    defect_in_mask: int = 0
    defect_in_random_mask: int = 0
    control_defect_in_mask: int = 0
    empty_masks: int = 0
    concentration: list = field(default_factory=list)
    random_concentration: list = field(default_factory=list)
    auroc: list = field(default_factory=list)
    top_mass: list = field(default_factory=list)
    control_top_mass: list = field(default_factory=list)

    def summary(self) -> dict:
        def mean(values):
            finite = [v for v in values if np.isfinite(v)]
            return float(np.mean(finite)) if finite else float("nan")

        return {
            "cases": self.cases,
            "defect_rate": self.defect_in_mask / max(self.cases, 1),
            "random_mask_defect_rate": self.defect_in_random_mask / max(self.cases, 1),
            "control_defect_rate": self.control_defect_in_mask / max(self.cases, 1),
            "empty_mask_rate": self.empty_masks / max(self.cases, 1),
            "mask_hit": mean(self.concentration),
            "random_mask_hit": mean(self.random_concentration),
            "auroc": mean(self.auroc),
            "top10_mass": mean(self.top_mass),
        }


def _as_float_images(pil_or_array) -> np.ndarray:
    if isinstance(pil_or_array, list):
        return np.stack([np.asarray(image).astype(np.float32) / 255.0 for image in pil_or_array])
    return np.asarray(pil_or_array, dtype=np.float32)


def evaluate(
    pipe,
    crops_per_texture: int = 16,
    seed: int = 0,
    num_inference_steps: int = 50,
    strength: float = 0.75,
    guidance_scale: float = 7.5,
    textures: tuple[str, ...] = TEXTURES,
    kinds: tuple[str, ...] = DEFECT_KINDS,
    **call_kwargs,
) -> dict[str, dict]:
    """Run every measure for each defect kind; return `{kind: summary}`.

    Each texture's first `crops_per_texture` held-out crops form one batch per
    kind, with the generator seeded `seed + crop index` for each crop.
    """
    from diffusers import StableDiffusionImg2ImgPipeline

    img2img = StableDiffusionImg2ImgPipeline.from_pipe(pipe, requires_safety_checker=False)
    img2img.set_progress_bar_config(disable=True)
    results = {kind: KindResult() for kind in kinds}
    rng = np.random.default_rng(seed)

    for texture in textures:
        crops = heldout_crops(texture)[:crops_per_texture]
        count = len(crops)
        with torch.no_grad():
            image_latents = pipe.encode_images(torch.from_numpy(crops).permute(0, 3, 1, 2))

        def generators():
            return [torch.Generator().manual_seed(seed + index) for index in range(count)]

        def run_img2img(prompt: str) -> np.ndarray:
            # Latents as `image` skip the VAE sampling, so img2img's first draw from each
            # generator is the same noise DeltaDeno draws.
            output = img2img(
                prompt=[prompt] * count, image=image_latents, strength=strength, guidance_scale=guidance_scale,
                num_inference_steps=num_inference_steps, generator=generators(), output_type="np",
            )
            return output.images

        normal_prompt = caption(texture)
        control = run_img2img(normal_prompt)
        for kind in kinds:
            anomaly_prompt = caption(texture, kind)
            result = results[kind]
            output = pipe(
                image=list(crops), prompt=normal_prompt, anomaly_prompt=anomaly_prompt,
                num_inference_steps=num_inference_steps, strength=strength, guidance_scale=guidance_scale,
                generator=generators(), output_type="np", **call_kwargs,
            )
            free_edit = run_img2img(anomaly_prompt)
            for index in range(count):
                mask = output.masks[index] > 0.5
                random_mask = rolled_mask(mask, rng)
                result.cases += 1
                result.empty_masks += bool(output.empty_masks[index])
                result.defect_in_mask += defect_visible(kind, crops[index], output.images[index], mask)
                result.defect_in_random_mask += defect_visible(kind, crops[index], output.images[index], random_mask)
                result.control_defect_in_mask += defect_visible(kind, crops[index], control[index], mask)
                if mask.any():
                    result.concentration.append(change_concentration(crops[index], free_edit[index], mask))
                    result.random_concentration.append(
                        change_concentration(crops[index], free_edit[index], random_mask)
                    )
                result.top_mass.append(top_mass_share(output.localization_maps[index]))

            # Attribution on real defects painted into the crops.
            painted, painted_masks = zip(*(paint_defect(crop, kind, rng) for crop in crops))
            attribution = pipe(
                image=list(painted), prompt=normal_prompt, anomaly_prompt=anomaly_prompt,
                num_inference_steps=num_inference_steps, strength=strength, guidance_scale=guidance_scale,
                generator=generators(), output_type="np", **call_kwargs,
            )
            for index in range(count):
                result.auroc.append(auroc(attribution.localization_maps[index], painted_masks[index]))

    return {kind: result.summary() for kind, result in results.items()}


def format_markdown(summaries: dict[str, dict]) -> str:
    """Render the summaries as a markdown table, one row per defect kind."""
    header = (
        "| defect | cases | defect in mask | in random mask | control (normal prompt) | empty masks "
        "| mask hit (chance = 1) | random mask hit | AUROC painted | top-10 % mass |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for kind, s in summaries.items():
        rows.append(
            f"| {kind} | {s['cases']} | {s['defect_rate']:.2f} | {s['random_mask_defect_rate']:.2f} "
            f"| {s['control_defect_rate']:.2f} | {s['empty_mask_rate']:.2f} | {s['mask_hit']:.2f} "
            f"| {s['random_mask_hit']:.2f} | {s['auroc']:.3f} | {s['top10_mass']:.2f} |"
        )
    return header + "\n".join(rows) + "\n"



def mask_agreement(
    pipe,
    first_kwargs: dict,
    second_kwargs: dict,
    crops_per_texture: int = 16,
    seed: int = 0,
    textures: tuple[str, ...] = TEXTURES,
    kinds: tuple[str, ...] = DEFECT_KINDS,
    **call_kwargs,
) -> dict[str, float]:
    """Compare the masks of two pipeline settings on the same crops and seeds.

    Returns the mean intersection over union of the two masks and the share of
    cases where the two masks overlap at all, over every texture and kind.
    """
    ious = []
    for texture in textures:
        crops = list(heldout_crops(texture)[:crops_per_texture])
        for kind in kinds:
            masks = []
            for settings in (first_kwargs, second_kwargs):
                output = pipe(
                    image=crops, prompt=caption(texture), anomaly_prompt=caption(texture, kind),
                    generator=[torch.Generator().manual_seed(seed + index) for index in range(len(crops))],
                    output_type="np", **call_kwargs, **settings,
                )
                masks.append(output.masks > 0.5)
            for first, second in zip(*masks):
                union = np.logical_or(first, second).sum()
                ious.append(float(np.logical_and(first, second).sum() / union) if union else 1.0)
    return {"mean_iou": float(np.mean(ious)), "overlap_rate": float(np.mean([iou > 0 for iou in ious]))}
