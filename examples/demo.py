"""Run DeltaDeno offline on the bundled small model and the bundled held-out photos.

For every example image in `examples/images/` and every defect kind the small
model was trained on, paint one defect and write the result image, its mask
and an overview grid (input | localization map | mask | output) to the output
folder. Runs on a 2-core CPU in well under a minute and needs no network.

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


def grid_row(source: np.ndarray, result) -> np.ndarray:
    """Build one grid row: input | localization map | mask over output | output."""
    output = np.asarray(result.images[0])
    mask = np.asarray(result.masks[0]) > 127
    tiles = [source, colorize(result.localization_maps[0]), overlay(output, mask), output]
    separator = np.full((source.shape[0], 1, 3), 255, dtype=np.uint8)
    row = np.concatenate([part for tile in tiles for part in (tile, separator)][:-1], axis=1)
    return np.kron(row, np.ones((GRID_ZOOM, GRID_ZOOM, 1), dtype=np.uint8))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="diffusers Stable Diffusion folder or Hub id")
    parser.add_argument("--images", default=DEFAULT_IMAGES, help="folder of defect-free PNG images")
    parser.add_argument("--out", default=os.path.join(REPO_ROOT, "outputs", "demo"), help="output folder")
    parser.add_argument("--seed", type=int, default=0)
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

    rows = []
    for path in paths:
        name = os.path.splitext(os.path.basename(path))[0]
        # Example file names are "<texture>_<index>.png"; the texture is the object word.
        texture = name.rsplit("_", 1)[0]
        source = np.asarray(PIL.Image.open(path).convert("RGB"))
        for defect in DEFECT_KINDS:
            result = pipe(
                image=PIL.Image.fromarray(source),
                prompt=f"a photo of {texture}",
                anomaly_prompt=f"a photo of {texture} with a {defect}",
                num_inference_steps=args.steps,
                strength=args.strength,
                guidance_scale=args.guidance_scale,
                generator=torch.Generator().manual_seed(args.seed),
            )
            result.images[0].save(os.path.join(args.out, f"{name}_{defect}.png"))
            result.masks[0].save(os.path.join(args.out, f"{name}_{defect}_mask.png"))
            rows.append(grid_row(source, result))
            status = "empty mask" if result.empty_masks[0] else f"change inside mask {result.mask_change[0]:.3f}"
            print(f"{name:10s} {defect:8s} {status}")

    grid_path = os.path.join(args.out, "grid.png")
    PIL.Image.fromarray(np.concatenate(rows, axis=0)).save(grid_path)
    print(f"wrote {len(rows)} results and {grid_path} (input | localization map | mask | output) "
          f"in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
