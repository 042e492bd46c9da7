"""The four ways users load DeltaDeno, each followed by a real call."""

import json
import os
import subprocess
import sys

import torch
from conftest import REPO_ROOT, default_call_kwargs, textured_image
from diffusers import DiffusionPipeline, StableDiffusionPipeline

from pipeline_deltadeno import DeltaDenoPipeline


def call_output(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe(image=textured_image(0), **default_call_kwargs(output_type="pt"))


def test_load_custom_pipeline_file(tiny_model_dir):
    pipe = DiffusionPipeline.from_pretrained(
        tiny_model_dir,
        custom_pipeline=os.path.join(REPO_ROOT, "pipeline_deltadeno.py"),
        trust_remote_code=True,
    )
    assert type(pipe).__name__ == "DeltaDenoPipeline"
    assert type(pipe).__module__ != DeltaDenoPipeline.__module__
    reference = call_output(DeltaDenoPipeline.from_pretrained(tiny_model_dir))
    assert torch.equal(call_output(pipe).images, reference.images)


def test_load_save_pretrained_hub_folder(tiny_model_dir, tmp_path):
    pipe = DeltaDenoPipeline.from_pretrained(tiny_model_dir)
    reference = call_output(pipe)
    pipe.save_pretrained(tmp_path)
    assert (tmp_path / "pipeline_deltadeno.py").is_file()
    assert (tmp_path / "attention_processors.py").is_file()
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_deltadeno", "DeltaDenoPipeline"]

    loaded = DiffusionPipeline.from_pretrained(str(tmp_path), trust_remote_code=True)
    assert type(loaded).__name__ == "DeltaDenoPipeline"
    assert torch.equal(call_output(loaded).images, reference.images)


def test_load_save_pretrained_reloads_with_class(tiny_model_dir, tmp_path):
    pipe = DeltaDenoPipeline.from_pretrained(tiny_model_dir)
    reference = call_output(pipe)
    pipe.save_pretrained(tmp_path)
    # The folder names its own pipeline file, so diffusers requires trust_remote_code here too.
    loaded = DeltaDenoPipeline.from_pretrained(str(tmp_path), trust_remote_code=True)
    assert type(loaded).__name__ == "DeltaDenoPipeline"
    assert torch.equal(call_output(loaded).images, reference.images)


def test_load_from_pipe_shares_components(tiny_model_dir):
    sd = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    pipe = DeltaDenoPipeline.from_pipe(sd)
    assert pipe.unet is sd.unet
    assert pipe.vae is sd.vae
    assert pipe.tokenizer is sd.tokenizer
    assert call_output(pipe).empty_masks == [False]


def test_load_after_pip_install(tiny_model_dir, tmp_path, installed_site):
    target = installed_site
    script = (
        "import torch, pipeline_deltadeno, attention_processors\n"
        "from pipeline_deltadeno import DeltaDenoPipeline\n"
        f"assert pipeline_deltadeno.__file__.startswith({target!r}), pipeline_deltadeno.__file__\n"
        f"pipe = DeltaDenoPipeline.from_pretrained({tiny_model_dir!r})\n"
        "pipe.set_progress_bar_config(disable=True)\n"
        "import numpy as np\n"
        "image = np.random.default_rng(0).uniform(0, 1, (32, 32, 3)).astype('float32')\n"
        "out = pipe(image=image, prompt='a photo of a bottle', anomaly_prompt='a photo of a bottle with a crack',"
        " num_inference_steps=6, strength=0.8, generator=torch.Generator().manual_seed(0), output_type='np')\n"
        "print('masks', out.masks.shape)\n"
    )
    environment = dict(os.environ, PYTHONPATH=target, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "masks (1, 32, 32)" in result.stdout
