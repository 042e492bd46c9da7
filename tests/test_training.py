"""The small model's training script: same seed and thread count, same weights.

Two short runs of `small_model/train.py` in subprocesses, each with 2 torch
threads, must save bit-identical tensors, and the folder must load as a Stable
Diffusion pipeline offline. With plain indexing (`embeds[ids]`) in the
caption gather, the UNet losses logged by two such runs differed.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT
from safetensors.torch import load_file

TRAIN_SCRIPT = os.path.join(REPO_ROOT, "small_model", "train.py")
SHORT_RUN = [
    "--seed", "3", "--threads", "2", "--num-crops", "96",
    "--vae-steps", "4", "--vae-batch", "8", "--unet-steps", "8", "--unet-batch", "32", "--log-every", "4",
]
WEIGHT_FILES = {
    "vae": "vae/diffusion_pytorch_model.safetensors",
    "unet": "unet/diffusion_pytorch_model.safetensors",
    "text_encoder": "text_encoder/model.safetensors",
}


def train_short(out_dir) -> dict:
    """Run the training script with a tiny budget into `out_dir` and return its summary."""
    summary_path = os.path.join(out_dir, "summary.json")
    run = subprocess.run(
        [sys.executable, TRAIN_SCRIPT, "--out", os.path.join(out_dir, "model"), "--summary", summary_path, *SHORT_RUN],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    with open(summary_path, encoding="utf-8") as handle:
        return json.load(handle)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    first = tmp_path_factory.mktemp("train_first")
    second = tmp_path_factory.mktemp("train_second")
    return (first, train_short(str(first))), (second, train_short(str(second)))


@pytest.mark.parametrize("component", sorted(WEIGHT_FILES))
def test_training_repeats_bit_identical(two_runs, component):
    (first, _), (second, _) = two_runs
    tensors_first = load_file(os.path.join(first, "model", WEIGHT_FILES[component]))
    tensors_second = load_file(os.path.join(second, "model", WEIGHT_FILES[component]))
    assert sorted(tensors_first) == sorted(tensors_second)
    differing = [name for name in tensors_first if not torch.equal(tensors_first[name], tensors_second[name])]
    assert differing == [], f"{component}: {len(differing)} tensors differ between two runs, e.g. {differing[:3]}"


def test_training_logs_same_losses(two_runs):
    (_, summary_first), (_, summary_second) = two_runs
    assert len(summary_first["unet_log"]) == 2
    assert summary_first["vae_log"] == summary_second["vae_log"]
    assert summary_first["unet_log"] == summary_second["unet_log"]


def test_training_output_loads_offline(two_runs):
    from diffusers import StableDiffusionPipeline

    (first, _), _ = two_runs
    pipe = StableDiffusionPipeline.from_pretrained(os.path.join(first, "model"))
    assert pipe.unet.dtype == torch.float32
    assert pipe.text_encoder.dtype == torch.float32
    image = pipe(
        "a photo of brick with a hole", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np"
    ).images
    assert image.shape == (1, 32, 32, 3)
