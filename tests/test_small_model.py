"""Behaviour of the method on the bundled small trained model, measured against baselines.

The measures are those of `small_model/evaluation.py`, on 2 held-out crops per
texture (6 cases per defect kind) at 30 steps. Thresholds sit below the values
measured at this setting (small_model/RESULTS.md) with a margin, and above
what a broken step gives: a random mask, the normal-prompt control, or chance.
"""

import os

import numpy as np
import pytest
import torch
from conftest import SMALL_MODEL_DIR
from data import DEFECT_KINDS, caption, heldout_crops
from evaluation import evaluate

from pipeline_deltadeno import DeltaDenoPipeline

STEPS = 30
CROPS_PER_TEXTURE = 2


@pytest.fixture(scope="module")
def small_pipe():
    assert os.path.isfile(os.path.join(SMALL_MODEL_DIR, "model_index.json")), "the bundled small model is missing"
    pipe = DeltaDenoPipeline.from_pretrained(SMALL_MODEL_DIR)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def summaries(small_pipe):
    return evaluate(small_pipe, crops_per_texture=CROPS_PER_TEXTURE, num_inference_steps=STEPS)


@pytest.mark.parametrize("kind", DEFECT_KINDS)
def test_small_model_defect_appears_in_mask(summaries, kind):
    assert summaries[kind]["defect_rate"] >= 0.66


@pytest.mark.parametrize("kind", DEFECT_KINDS)
def test_small_model_random_mask_sees_no_defect(summaries, kind):
    assert summaries[kind]["random_mask_defect_rate"] <= 0.34


@pytest.mark.parametrize("kind", DEFECT_KINDS)
def test_small_model_defect_comes_from_anomaly_prompt(summaries, kind):
    # The normal prompt with the same noise rarely paints the defect inside the same mask.
    assert summaries[kind]["control_defect_rate"] <= summaries[kind]["defect_rate"] - 0.3


@pytest.mark.parametrize("kind", DEFECT_KINDS)
def test_small_model_no_empty_masks(summaries, kind):
    assert summaries[kind]["empty_mask_rate"] == 0.0


@pytest.mark.parametrize("kind", DEFECT_KINDS)
def test_small_model_mask_marks_free_edit(summaries, kind):
    # An unmasked img2img edit with the same noise changes the masked pixels more than chance (1.0).
    assert summaries[kind]["mask_hit"] >= 1.3
    assert summaries[kind]["mask_hit"] >= summaries[kind]["random_mask_hit"] + 0.2


@pytest.mark.parametrize("kind", DEFECT_KINDS)
def test_small_model_map_finds_painted_defect(summaries, kind):
    assert summaries[kind]["auroc"] >= 0.65


@pytest.mark.parametrize("kind", DEFECT_KINDS)
def test_small_model_map_is_concentrated(summaries, kind):
    # A uniform map puts 10 % of its mass in its top 10 % of pixels.
    assert summaries[kind]["top10_mass"] >= 0.25


def test_small_model_output_changes_only_near_mask(small_pipe):
    crop = heldout_crops("gravel")[5]
    output = small_pipe(
        image=crop, prompt=caption("gravel"), anomaly_prompt=caption("gravel", "stain"),
        num_inference_steps=STEPS, generator=torch.Generator().manual_seed(3), output_type="np", feather_sigma=1.0,
    )
    mask = torch.from_numpy(output.masks)[:, None]
    reach = torch.nn.functional.max_pool2d(mask, 7, stride=1, padding=3)[0, 0].numpy() > 0
    result = np.round(output.images[0] * 255)
    original = np.round(crop * 255)
    assert np.array_equal(result[~reach], original[~reach])
    assert output.mask_change[0] > 0.05
