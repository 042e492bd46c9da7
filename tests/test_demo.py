"""The README's first command: `examples/demo.py` on the bundled model and example images."""

import glob
import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
from conftest import REPO_ROOT, SMALL_MODEL_DIR
from data import DEFECT_KINDS

DEMO = os.path.join(REPO_ROOT, "examples", "demo.py")
EXAMPLE_IMAGES = sorted(glob.glob(os.path.join(REPO_ROOT, "examples", "images", "*.png")))
EXAMPLE_NAMES = [os.path.splitext(os.path.basename(path))[0] for path in EXAMPLE_IMAGES]


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    (out / "notes.txt").write_text("the user's own file")
    run = subprocess.run(
        [sys.executable, DEMO, "--out", str(out), "--steps", "20"],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return out


def test_demo_writes_every_result(demo_out):
    assert os.path.isdir(SMALL_MODEL_DIR)
    assert len(EXAMPLE_IMAGES) >= 2
    for path, name in zip(EXAMPLE_IMAGES, EXAMPLE_NAMES):
        for defect in DEFECT_KINDS:
            image = PIL.Image.open(demo_out / f"{name}_{defect}.png")
            mask = np.asarray(PIL.Image.open(demo_out / f"{name}_{defect}_mask.png"))
            assert image.size == PIL.Image.open(path).size
            assert set(np.unique(mask)) <= {0, 255}
            assert mask.any(), f"{name} {defect}: empty mask"


def test_demo_grid_has_row_per_image(demo_out):
    # Each row: the input, then map, mask and output per defect, with 1-pixel
    # separators, all enlarged by one integer zoom factor.
    grid = PIL.Image.open(demo_out / "grid.png")
    tile = PIL.Image.open(EXAMPLE_IMAGES[0]).size[1]
    tiles_per_row = 1 + 3 * len(DEFECT_KINDS)
    row_height, remainder = divmod(grid.size[1], len(EXAMPLE_NAMES))
    assert remainder == 0
    assert row_height % tile == 0
    zoom = row_height // tile
    assert grid.size[0] == (tiles_per_row * tile + tiles_per_row - 1) * zoom


def test_demo_leaves_no_temporary_files(demo_out):
    expected = {"grid.png", "notes.txt"}
    for name in EXAMPLE_NAMES:
        expected |= {f"{name}_{defect}{suffix}.png" for defect in DEFECT_KINDS for suffix in ("", "_mask")}
    assert set(os.listdir(demo_out)) == expected
    assert (demo_out / "notes.txt").read_text() == "the user's own file"


@pytest.mark.parametrize("defect", DEFECT_KINDS)
def test_demo_defects_vary_in_place(demo_out, defect):
    # Each image has its own seed. With one seed shared by all images, the hole masks
    # and the stain masks each fell into only two cells of this 8-pixel grid.
    centroids = set()
    for name in EXAMPLE_NAMES:
        rows, columns = np.nonzero(np.asarray(PIL.Image.open(demo_out / f"{name}_{defect}_mask.png")))
        centroids.add((round(rows.mean() / 8), round(columns.mean() / 8)))
    assert len(centroids) >= 3, f"{defect}: mask centroids fall in only {sorted(centroids)}"
