"""Run DeltaDeno offline on the bundled small model and the bundled held-out photos.

For every example image in `examples/images/` and every defect kind the small
model was trained on, paint one defect and write the result image and its mask
to the output folder. The overview grid `grid.png` has one row per image: the
input, then for each defect its localization map, its mask over the output, and
the output. Needs no network.

    python examples/demo.py                      # writes outputs/demo/
    python examples/demo.py --out my_dir --seed 3

The small model is a 32x32-pixel toy trained in this repository on texture
photos; it shows the method working, not Stable Diffusion's image quality.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402
import torch  # noqa: E402

from deltadeno_dataset import write_png_atomic  # noqa: E402
from pipeline_deltadeno import DeltaDenoPipeline  # noqa: E402

DEFAULT_MODEL = os.path.join(REPO_ROOT, "small_model", "deltadeno-small")
DEFAULT_IMAGES = os.path.join(REPO_ROOT, "examples", "images")
DEFECT_KINDS = ("hole", "scratch", "stain")
# Each 32-pixel tile is enlarged by this factor in the grid so a person can see it.
GRID_ZOOM = 6


def colorize(values: np.ndarray) -> np.ndarray:
    """Map a (h, w) array in [0, 1] to an RGB uint8 heat map (black, red, yellow, white)."""
    values = np.clip(values, 0, 1)
    red = np.clip(values * 3, 0, 1)
    green = np.clip(values * 3 - 1, 0, 1)
    blue = np.clip(values * 3 - 2, 0, 1)
    return (np.stack([red, green, blue], axis=-1) * 255).astype(np.uint8)


def overlay(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Tint the masked pixels of a uint8 RGB image red."""
    tinted = image.astype(np.float32)
    tinted[mask] = 0.5 * tinted[mask] + 0.5 * np.array([255, 0, 0])
    return tinted.astype(np.uint8)


def tiles_for(output, mask, localization_map) -> list[np.ndarray]:
    """Return the three tiles shown per defect: localization map, mask over output, output."""
    return [colorize(localization_map), overlay(output, mask), output]


def grid_row(tiles: list[np.ndarray]) -> np.ndarray:
    """Join tiles left to right with one-pixel white separators and enlarge them."""
    separator = np.full((tiles[0].shape[0], 1, 3), 255, dtype=np.uint8)
    row = np.concatenate([part for tile in tiles for part in (tile, separator)][:-1], axis=1)
    return np.kron(row, np.ones((GRID_ZOOM, GRID_ZOOM, 1), dtype=np.uint8))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="diffusers Stable Diffusion folder or Hub id")
    parser.add_argument("--images", default=DEFAULT_IMAGES, help="folder of defect-free PNG images")
    parser.add_argument("--out", default=os.path.join(REPO_ROOT, "outputs", "demo"), help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first image (image i uses seed + i)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--strength", type=float, default=0.75)
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    paths = sorted(glob.glob(os.path.join(args.images, "*.png")))
    if not paths:
        sys.exit(f"no PNG images found in {args.images}")
    if not os.path.isdir(args.model) and args.model == DEFAULT_MODEL:
        sys.exit(f"the bundled model is missing at {args.model}; run from a full clone of the repository")
    torch.set_num_threads(os.cpu_count() or 1)

    start = time.perf_counter()
    pipe = DeltaDenoPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    os.makedirs(args.out, exist_ok=True)

    names = [os.path.splitext(os.path.basename(path))[0] for path in paths]
    sources = [np.asarray(PIL.Image.open(path).convert("RGB")) for path in paths]
    # Example file names are "<texture>_<index>.png"; the texture is the object word.
    textures = [name.rsplit("_", 1)[0] for name in names]
    tiles = [[source] for source in sources]
    count = 0
    for defect in DEFECT_KINDS:
        # One batched call per defect kind. Image i gets its own generator seeded with
        # seed + i, so its result does not depend on the other images in the batch. With
        # one shared seed every image got the same noise, and every defect the same place.
        result = pipe(
            image=[PIL.Image.fromarray(source) for source in sources],
            prompt=[f"a photo of {texture}" for texture in textures],
            anomaly_prompt=[f"a photo of {texture} with a {defect}" for texture in textures],
            num_inference_steps=args.steps,
            strength=args.strength,
            guidance_scale=args.guidance_scale,
            generator=[torch.Generator().manual_seed(args.seed + index) for index in range(len(sources))],
        )
        for index, name in enumerate(names):
            write_png_atomic(result.images[index], os.path.join(args.out, f"{name}_{defect}.png"))
            write_png_atomic(result.masks[index], os.path.join(args.out, f"{name}_{defect}_mask.png"))
            mask = np.asarray(result.masks[index]) > 127
            tiles[index] += tiles_for(np.asarray(result.images[index]), mask, result.localization_maps[index])
            status = "empty mask" if result.empty_masks[index] else f"change inside mask {result.mask_change[index]:.3f}"
            print(f"{name:10s} {defect:8s} {status}")
            count += 1
    rows = [grid_row(row) for row in tiles]

    grid_path = os.path.join(args.out, "grid.png")
    write_png_atomic(PIL.Image.fromarray(np.concatenate(rows, axis=0)), grid_path)
    columns = " | ".join(f"{defect}: map, mask, output" for defect in DEFECT_KINDS)
    print(f"wrote {count} results and {grid_path} (input | {columns}) "
          f"in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
