"""Texture crops and painted defects for the small DeltaDeno model.

The images are three grayscale texture photographs that scikit-image ships
(`brick`, `grass`, `gravel`, 512x512), downsampled by 2 to 256x256 and
repeated into three RGB channels. The bottom-right quadrant of each photo
(rows and columns 128-255 after downsampling) is held out: no training crop
overlaps it, and the evaluation crops and the example images come only
from it.

Images are float32 numpy arrays of shape (height, width, 3) with values in
[0, 1]. Masks are boolean arrays of shape (height, width).
"""

from __future__ import annotations

import os

import numpy as np

TEXTURES = ("brick", "grass", "gravel")
DEFECT_KINDS = ("hole", "scratch", "stain")
CROP_SIZE = 32
# Each 512x512 photo is average-pooled by this factor, so a 32x32 crop
# covers 64x64 pixels of the photo.
DOWNSAMPLE = 2
PHOTO_SIZE = 512 // DOWNSAMPLE
# Held-out region in downsampled pixels: rows and columns [128, 256).
HELDOUT_START = PHOTO_SIZE // 2


def load_texture(texture: str) -> np.ndarray:
    """Load one scikit-image texture photo as a (256, 256, 3) float32 image in [0, 1]."""
    if texture not in TEXTURES:
        raise ValueError(f"Invalid texture {texture!r}; expected one of {TEXTURES}.")
    from skimage import data as skimage_data

    photo = getattr(skimage_data, texture)().astype(np.float32) / 255.0
    photo = photo.reshape(PHOTO_SIZE, DOWNSAMPLE, PHOTO_SIZE, DOWNSAMPLE).mean(axis=(1, 3))
    return np.repeat(photo[:, :, None], 3, axis=2)


def _overlaps_heldout(top: int, left: int, size: int) -> bool:
    return top + size > HELDOUT_START and left + size > HELDOUT_START


def train_crops(num_crops: int, seed: int, size: int = CROP_SIZE) -> tuple[np.ndarray, list[str]]:
    """Cut `num_crops` random crops outside the held-out quadrant, cycling over the textures.

    Each crop is flipped horizontally and vertically at random. Returns the
    crops as a (num_crops, size, size, 3) array and the texture name of each.
    """
    rng = np.random.default_rng(seed)
    photos = {texture: load_texture(texture) for texture in TEXTURES}
    crops = np.empty((num_crops, size, size, 3), dtype=np.float32)
    textures = []
    for index in range(num_crops):
        texture = TEXTURES[index % len(TEXTURES)]
        while True:
            top, left = rng.integers(0, PHOTO_SIZE - size + 1, size=2)
            if not _overlaps_heldout(top, left, size):
                break
        crop = photos[texture][top : top + size, left : left + size]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        if rng.random() < 0.5:
            crop = crop[::-1, :]
        crops[index] = crop
        textures.append(texture)
    return crops, textures


def heldout_crops(texture: str, size: int = CROP_SIZE) -> np.ndarray:
    """Return the non-overlapping crops of the held-out quadrant, row by row: (16, 32, 32, 3) at size 32."""
    region = load_texture(texture)[HELDOUT_START:, HELDOUT_START:]
    per_side = region.shape[0] // size
    crops = [
        region[row * size : (row + 1) * size, col * size : (col + 1) * size]
        for row in range(per_side)
        for col in range(per_side)
    ]
    return np.stack(crops).astype(np.float32)


def caption(texture: str, kind: str | None = None) -> str:
    """Return the training caption, e.g. "a photo of brick" or "a photo of brick with a scratch"."""
    if kind is None:
        return f"a photo of {texture}"
    return f"a photo of {texture} with a {kind}"


def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    # Pixel centres, so that a disc of radius r centred at (cy, cx) is symmetric.
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    return ys + 0.5, xs + 0.5


def _hole_alpha(size: int, rng: np.random.Generator) -> np.ndarray:
    ys, xs = _pixel_grid(size)
    scale = size / CROP_SIZE
    radius = rng.uniform(2.0, 4.0) * scale
    cy, cx = rng.uniform(radius + 2 * scale, size - radius - 2 * scale, size=2)
    distance = np.hypot(ys - cy, xs - cx)
    # Antialiased edge one pixel wide.
    return np.clip(radius + 0.5 - distance, 0.0, 1.0)


def _scratch_alpha(size: int, rng: np.random.Generator) -> np.ndarray:
    ys, xs = _pixel_grid(size)
    angle = rng.uniform(0.0, np.pi)
    length = rng.uniform(0.4, 0.75) * size
    half_width = rng.uniform(0.5, 0.9) * size / CROP_SIZE
    dy, dx = np.sin(angle), np.cos(angle)
    # Keep both end points inside the image.
    reach_y = abs(dy) * length / 2 + 2
    reach_x = abs(dx) * length / 2 + 2
    cy = rng.uniform(reach_y, size - reach_y)
    cx = rng.uniform(reach_x, size - reach_x)
    # Distance from each pixel to the segment centred at (cy, cx).
    along = np.clip((ys - cy) * dy + (xs - cx) * dx, -length / 2, length / 2)
    distance = np.hypot(ys - (cy + along * dy), xs - (cx + along * dx))
    return np.clip(half_width + 0.5 - distance, 0.0, 1.0)


def _stain_alpha(size: int, rng: np.random.Generator) -> np.ndarray:
    ys, xs = _pixel_grid(size)
    scale = size / CROP_SIZE
    radius_a, radius_b = rng.uniform(3.0, 6.0, size=2) * scale
    tilt = rng.uniform(0.0, np.pi)
    margin = max(radius_a, radius_b) + 2 * scale
    cy, cx = rng.uniform(margin, size - margin, size=2)
    rel_y, rel_x = ys - cy, xs - cx
    u = rel_x * np.cos(tilt) + rel_y * np.sin(tilt)
    v = -rel_x * np.sin(tilt) + rel_y * np.cos(tilt)
    # Irregular outline: the ellipse radius wobbles with the polar angle.
    theta = np.arctan2(v, u)
    wobble = 1.0 + 0.15 * np.sin(3 * theta + rng.uniform(0, 2 * np.pi))
    wobble += 0.1 * np.sin(5 * theta + rng.uniform(0, 2 * np.pi))
    level = np.hypot(u / radius_a, v / radius_b) / wobble
    # Soft edge: full inside level 0.8, zero beyond level 1.2.
    return np.clip((1.2 - level) / 0.4, 0.0, 1.0)


def paint_defect(
    image: np.ndarray, kind: str, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Paint one defect of `kind` at a random position; return (new image, defect mask).

    `hole` is a dark round spot of radius 2-4 px, `scratch` a thin dark line
    at a random angle (length 40-75 % of the side), `stain` a bright
    irregular blotch of radius 3-6 px. Sizes are in pixels of a 32x32 crop
    and scale with the image side. The mask marks pixels whose paint
    opacity is at least 0.5.
    """
    if kind not in DEFECT_KINDS:
        raise ValueError(f"Invalid defect kind {kind!r}; expected one of {DEFECT_KINDS}.")
    height, width = image.shape[:2]
    if height != width:
        raise ValueError(f"Invalid image size {height}x{width}: paint_defect expects a square image.")

    if kind == "hole":
        alpha = _hole_alpha(height, rng)
        paint = rng.uniform(0.03, 0.12)
    elif kind == "scratch":
        alpha = _scratch_alpha(height, rng) * rng.uniform(0.8, 0.95)
        paint = rng.uniform(0.02, 0.10)
    else:
        alpha = _stain_alpha(height, rng) * rng.uniform(0.75, 0.9)
        paint = rng.uniform(0.9, 1.0)

    alpha = alpha.astype(np.float32)[:, :, None]
    painted = image * (1.0 - alpha) + paint * alpha
    mask = alpha[:, :, 0] >= 0.5
    return painted.astype(np.float32), mask


def make_training_set(num_crops: int, seed: int, defect_fraction: float = 0.5) -> dict:
    """Build the training crops, with a defect painted on about `defect_fraction` of them.

    Returns a dict with `images` (N, 32, 32, 3) float32, `masks` (N, 32, 32)
    bool, `captions`, `textures` and `kinds` (None for defect-free crops).
    Deterministic given `seed`.
    """
    images, textures = train_crops(num_crops, seed)
    rng = np.random.default_rng(seed + 1)
    masks = np.zeros(images.shape[:3], dtype=bool)
    kinds: list[str | None] = []
    for index in range(num_crops):
        kind = None
        if rng.random() < defect_fraction:
            kind = DEFECT_KINDS[rng.integers(len(DEFECT_KINDS))]
            images[index], masks[index] = paint_defect(images[index], kind, rng)
        kinds.append(kind)
    captions = [caption(texture, kind) for texture, kind in zip(textures, kinds)]
    return {"images": images, "masks": masks, "captions": captions, "textures": textures, "kinds": kinds}


def write_example_images(out_dir: str, per_texture: int = 3) -> list[str]:
    """Write `per_texture` held-out crops of each texture as PNGs (brick_0.png, ...); return their paths.

    The crops are spread evenly over the 16 held-out crops of each texture.
    """
    from PIL import Image

    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for texture in TEXTURES:
        crops = heldout_crops(texture)
        picks = np.linspace(0, len(crops) - 1, per_texture).round().astype(int)
        for number, index in enumerate(picks):
            path = os.path.join(out_dir, f"{texture}_{number}.png")
            pixels = (crops[index] * 255.0).round().clip(0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(path)
            paths.append(path)
    return paths
