"""deltadeno-generate: dataset layouts, crash-safe resume, rejection, path safety, bad inputs, several processes."""

import fcntl
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageFilter
import pytest
import torch
from conftest import REPO_ROOT, SMALL_MODEL_DIR, textured_image

import deltadeno_generate
from deltadeno_dataset import DatasetGenerationError, read_jsonl
from deltadeno_generate import RetryLimitExceeded, generate_dataset, main, slot_seed
from pipeline_deltadeno import DeltaDenoPipeline

# On the tiny random model, changes inside the mask lie around 0.3-0.42; this threshold rejects a
# few generations of the reference job, so its retries are part of what resume must reproduce.
MIN_CHANGE = 0.33
JOB = dict(
    object_name="bottle",
    defects=["crack", "hole"],
    images_per_defect=3,
    batch_size=2,
    min_change=MIN_CHANGE,
    max_retries=3,
    pipeline_kwargs={"num_inference_steps": 6, "strength": 0.8},
    progress=False,
)
CLI_JOB = [
    "--object", "bottle", "--defects", "crack", "hole", "--images-per-defect", "3", "--batch-size", "2",
    "--min-change", str(MIN_CHANGE), "--max-retries", "3", "--num-inference-steps", "6", "--strength", "0.8",
    "--no-progress",
]
SMALL_JOB = dict(
    object_name="bottle",
    defects=["crack"],
    images_per_defect=2,
    min_change=0.0,
    pipeline_kwargs={"num_inference_steps": 6, "strength": 0.8},
    progress=False,
)


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    pipe = DeltaDenoPipeline.from_pretrained(tiny_model_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("good")
    for index in range(3):
        textured_image(index).save(folder / f"{index:03d}.png")
    return str(folder)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, pipe, good_dir):
    """The reference job run once, uninterrupted, in this process."""
    output = str(tmp_path_factory.mktemp("reference"))
    summary = generate_dataset(good_dir, output, pipe=pipe, **JOB)
    return output, summary


def dataset_files(root) -> dict:
    """Return {relative path: bytes} of every file a job leaves, except shards and the lock file."""
    files = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            relative = os.path.relpath(path, root)
            if f"{os.sep}shards{os.sep}" in relative or name.endswith(".lock"):
                continue
            with open(path, "rb") as handle:
                files[relative] = handle.read()
    return files


def folder_hashes(folder) -> dict:
    return {
        name: hashlib.sha256(open(os.path.join(folder, name), "rb").read()).hexdigest()
        for name in sorted(os.listdir(folder))
    }


def subprocess_environment() -> dict:
    return dict(
        os.environ,
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        PYTHONPATH=REPO_ROOT,
        GLOO_SOCKET_IFNAME="lo",
    )


def free_local_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_metadata(output, category="bottle") -> list:
    return read_jsonl(os.path.join(output, "deltadeno_runs", category, "metadata.jsonl"))


def run_rejections(output, category="bottle") -> list:
    return read_jsonl(os.path.join(output, "deltadeno_runs", category, "rejections.jsonl"))


# ---------------------------------------------------------------------------
# Layouts and records


def test_mvtec_layout_files_and_masks(reference):
    output, summary = reference
    assert summary.complete == summary.requested == 6
    for defect in ("crack", "hole"):
        for slot in range(3):
            image = PIL.Image.open(os.path.join(output, "bottle", "test", defect, f"{slot:03d}.png"))
            mask = PIL.Image.open(os.path.join(output, "bottle", "ground_truth", defect, f"{slot:03d}_mask.png"))
            assert image.mode == "RGB"
            assert image.size == (32, 32)
            assert mask.mode == "L"
            assert mask.size == (32, 32)
            values = set(np.unique(np.asarray(mask)).tolist())
            assert values == {0, 255}


def test_mvtec_layout_has_no_other_files(reference):
    output, _ = reference
    assert sorted(os.listdir(output)) == ["bottle", "deltadeno_runs"]
    assert sorted(os.listdir(os.path.join(output, "bottle"))) == ["ground_truth", "test"]
    assert sorted(os.listdir(os.path.join(output, "bottle", "test", "crack"))) == ["000.png", "001.png", "002.png"]


def test_metadata_one_record_per_pair(reference, good_dir, tiny_model_dir):
    output, _ = reference
    records = run_metadata(output)
    assert [(r["defect"], r["slot"]) for r in records] == [(d, s) for d in ("crack", "hole") for s in range(3)]
    sources = sorted(os.listdir(good_dir))
    for record in records:
        assert os.path.basename(record["source_image"]) == sources[record["slot"] % 3]
        assert record["seed"] == slot_seed(0, record["defect"], record["slot"], record["attempt"])
        assert record["prompt"] == "a photo of a bottle"
        assert record["anomaly_prompt"] == f"a photo of a bottle with a {record['defect']}"
        assert record["mask_change"] >= MIN_CHANGE
        assert 0 < record["mask_area_fraction"] <= 0.25
        assert record["pipeline_arguments"]["num_inference_steps"] == 6
        assert record["pipeline_arguments"]["guidance_scale"] == 7.5
        assert record["model"] == tiny_model_dir
        assert set(record["versions"]) >= {"torch", "diffusers", "transformers", "deltadeno"}
        assert os.path.isfile(os.path.join(output, record["image"]))
        assert os.path.isfile(os.path.join(output, record["mask"]))


def test_metadata_regenerates_exact_pair(reference, pipe):
    output, _ = reference
    record = run_metadata(output)[1]
    arguments = {k: v for k, v in record["pipeline_arguments"].items() if v is not None}
    result = pipe(
        image=[PIL.Image.open(entry["source_image"]) for entry in record["batch"]],
        prompt=record["prompt"],
        anomaly_prompt=record["anomaly_prompt"],
        negative_prompt=record["negative_prompt"],
        generator=[torch.Generator().manual_seed(entry["seed"]) for entry in record["batch"]],
        output_type="pil",
        **arguments,
    )
    stored = np.asarray(PIL.Image.open(os.path.join(output, record["image"])))
    stored_mask = np.asarray(PIL.Image.open(os.path.join(output, record["mask"])))
    assert np.array_equal(np.asarray(result.images[record["batch_index"]]), stored)
    assert np.array_equal(np.asarray(result.masks[record["batch_index"]]), stored_mask)


def test_preview_grid_per_defect(reference):
    output, summary = reference
    previews = os.path.join(output, "deltadeno_runs", "bottle", "previews")
    assert sorted(os.listdir(previews)) == ["crack.png", "hole.png"]
    grid = PIL.Image.open(os.path.join(previews, "crack.png"))
    # 3 rows of 128-pixel tiles (32 pixels scaled by 4) under a 16-pixel header.
    assert grid.size[1] == 16 + 3 * (128 + 2)
    assert len(summary.preview_paths) == 2


def test_seas_layout(pipe, good_dir, tmp_path):
    generate_dataset(good_dir, str(tmp_path), pipe=pipe, layout="seas", **SMALL_JOB)
    assert sorted(os.listdir(tmp_path / "bottle")) == ["crack"]
    assert sorted(os.listdir(tmp_path / "bottle" / "crack" / "image")) == ["0.png", "1.png"]
    assert sorted(os.listdir(tmp_path / "bottle" / "crack" / "mask")) == ["0.png", "1.png"]
    mask = np.asarray(PIL.Image.open(tmp_path / "bottle" / "crack" / "mask" / "1.png"))
    assert set(np.unique(mask).tolist()) == {0, 255}
    assert [r["image"] for r in run_metadata(tmp_path)] == ["bottle/crack/image/0.png", "bottle/crack/image/1.png"]


def test_mvtec_input_category_and_words(pipe, tmp_path):
    good = tmp_path / "metal_nut" / "train" / "good"
    good.mkdir(parents=True)
    textured_image(5).save(good / "000.png")
    output = tmp_path / "out"
    generate_dataset(
        str(tmp_path / "metal_nut"), str(output), **{**SMALL_JOB, "object_name": "metal nut",
                                                      "defects": ["color=colour stain"]}, pipe=pipe,
    )
    record = run_metadata(output, "metal_nut")[0]
    assert record["image"] == "metal_nut/test/color/000.png"
    assert record["anomaly_prompt"] == "a photo of a metal nut with a colour stain"


def test_object_masks_confine_defects(pipe, good_dir, tmp_path):
    masks = tmp_path / "masks"
    masks.mkdir()
    part = np.zeros((32, 32), dtype=np.uint8)
    part[:, :16] = 255
    for name in sorted(os.listdir(good_dir))[:2]:
        PIL.Image.fromarray(part).save(masks / name)
    summary = generate_dataset(good_dir, str(tmp_path / "out"), pipe=pipe, object_mask_dir=str(masks),
                               **{**SMALL_JOB, "images_per_defect": 2})
    assert [os.path.basename(path) for path, _ in summary.skipped_images] == ["002.png"]
    for slot in range(2):
        mask = np.asarray(PIL.Image.open(tmp_path / "out" / "bottle" / "ground_truth" / "crack" / f"00{slot}_mask.png"))
        assert mask.any()
        assert not mask[:, 16:].any()


def test_input_images_unchanged(reference, good_dir):
    # The reference job read good_dir; its files must be as written by the fixture.
    for index in range(3):
        expected = textured_image(index)
        assert np.array_equal(np.asarray(PIL.Image.open(os.path.join(good_dir, f"{index:03d}.png"))), np.asarray(expected))


# ---------------------------------------------------------------------------
# Resume


@pytest.mark.parametrize("kill_after_images", [1, 3, 5])
def test_resume_after_sigkill_byte_identical(reference, pipe, good_dir, tiny_model_dir, tmp_path, kill_after_images):
    output = tmp_path / "out"
    command = [sys.executable, "-m", "deltadeno_generate", "--input", good_dir, "--output", str(output),
               "--model", tiny_model_dir, *CLI_JOB]
    process = subprocess.Popen(command, env=subprocess_environment(), cwd=REPO_ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    images = [output / "bottle" / "test" / defect for defect in ("crack", "hole")]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        count = sum(len([n for n in os.listdir(folder) if n.endswith(".png") and not n.startswith(".")])
                    for folder in images if folder.is_dir())
        if count >= kill_after_images:
            break
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, process.stderr.read().decode()[-2000:]
    assert not (output / "deltadeno_runs" / "bottle" / "metadata.jsonl").exists()
    shard = output / "deltadeno_runs" / "bottle" / "shards" / "metadata-rank0.jsonl"
    assert len(read_jsonl(str(shard))) < 6

    summary = generate_dataset(good_dir, str(output), pipe=pipe, **JOB)
    assert summary.complete == 6
    assert dataset_files(output) == dataset_files(reference[0])


def torn_last_record(output, category="bottle"):
    shard = output / "deltadeno_runs" / category / "shards" / "metadata-rank0.jsonl"
    lines = shard.read_bytes().splitlines(keepends=True)
    last = json.loads(lines[-1])
    shard.write_bytes(b"".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])
    os.remove(output / last["mask"])
    temporary = output / os.path.dirname(last["image"]) / f".{os.path.basename(last['image'])}.tmp12345"
    temporary.write_bytes(b"partial")


def lost_last_record(output, category="bottle"):
    shard = output / "deltadeno_runs" / category / "shards" / "metadata-rank0.jsonl"
    lines = shard.read_bytes().splitlines(keepends=True)
    shard.write_bytes(b"".join(lines[:-2]))


def deleted_image(output):
    record = read_jsonl(str(output / "deltadeno_runs" / "bottle" / "metadata.jsonl"))[2]
    os.remove(output / record["image"])


def unfinished_merge(output):
    run = output / "deltadeno_runs" / "bottle"
    os.remove(run / "metadata.jsonl")
    shutil.rmtree(run / "previews")
    (run / ".rejections.jsonl.tmp777").write_text("{")


@pytest.mark.parametrize("damage", [torn_last_record, lost_last_record, deleted_image, unfinished_merge])
def test_resume_simulated_crash_states(reference, pipe, good_dir, tmp_path, damage):
    output = tmp_path / "out"
    shutil.copytree(reference[0], output)
    damage(output)
    generate_dataset(good_dir, str(output), pipe=pipe, **JOB)
    assert dataset_files(output) == dataset_files(reference[0])
    assert not [n for _, _, names in os.walk(output) for n in names if ".tmp" in n]


def test_resume_rejects_changed_arguments(reference, pipe, good_dir, tmp_path):
    output = tmp_path / "out"
    shutil.copytree(reference[0], output)
    with pytest.raises(DatasetGenerationError, match=r"seed: 0 stored, 1 now") as error:
        generate_dataset(good_dir, str(output), pipe=pipe, **{**JOB, "seed": 1})
    assert "--overwrite" in str(error.value)
    with pytest.raises(DatasetGenerationError, match=r"pipeline argument strength: 0.8 stored, 0.9 now"):
        generate_dataset(good_dir, str(output), pipe=pipe, **{**JOB, "pipeline_kwargs": {"num_inference_steps": 6,
                                                                                       "strength": 0.9}})
    assert dataset_files(output) == dataset_files(reference[0])


def test_resume_rejects_changed_input(reference, pipe, good_dir, tmp_path):
    good, output = tmp_path / "good", tmp_path / "out"
    shutil.copytree(good_dir, good)
    generate_dataset(str(good), str(output), pipe=pipe, **SMALL_JOB)
    textured_image(7).save(good / "003.png")
    with pytest.raises(DatasetGenerationError, match="input images: 3 stored, 4 now"):
        generate_dataset(str(good), str(output), pipe=pipe, **SMALL_JOB)


def test_overwrite_equals_fresh_run(reference, pipe, good_dir, tmp_path):
    output, fresh = tmp_path / "out", tmp_path / "fresh"
    shutil.copytree(reference[0], output)
    changed = {**JOB, "defects": ["scratch"], "seed": 3}
    generate_dataset(good_dir, str(output), pipe=pipe, overwrite=True, **changed)
    generate_dataset(good_dir, str(fresh), pipe=pipe, **changed)
    assert dataset_files(output) == dataset_files(fresh)
    assert not (output / "bottle" / "test" / "crack").exists()


def test_second_job_on_category_rejected(reference, pipe, good_dir, tmp_path):
    output = tmp_path / "out"
    shutil.copytree(reference[0], output)
    with open(output / "deltadeno_runs" / "bottle.lock", "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(DatasetGenerationError, match="another deltadeno-generate job"):
            generate_dataset(good_dir, str(output), pipe=pipe, **JOB)


# ---------------------------------------------------------------------------
# Rejection of generations without a visible defect


def test_rejection_retry_limit_exhausted(pipe, good_dir, tmp_path):
    with pytest.raises(RetryLimitExceeded, match=r"2 slot\(s\) got no generation") as error:
        generate_dataset(good_dir, str(tmp_path), pipe=pipe, **{**SMALL_JOB, "min_change": 1.0, "max_retries": 1})
    summary = error.value.summary
    assert summary.complete == 0
    assert summary.rejected == 4
    assert summary.incomplete_slots == [("crack", 0), ("crack", 1)]
    rejections = run_rejections(tmp_path)
    assert [(r["slot"], r["attempt"]) for r in rejections] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert {r["reason"] for r in rejections} == {"low_change"}
    assert all(r["mask_change"] < 1.0 for r in rejections)
    assert all(r["seed"] == slot_seed(0, "crack", r["slot"], r["attempt"]) for r in rejections)
    assert os.listdir(tmp_path / "bottle" / "test" / "crack") == []
    assert run_metadata(tmp_path) == []


def test_rejection_rerun_repeats_nothing(pipe, good_dir, tmp_path):
    arguments = {**SMALL_JOB, "min_change": 1.0, "max_retries": 1}
    with pytest.raises(RetryLimitExceeded):
        generate_dataset(good_dir, str(tmp_path), pipe=pipe, **arguments)
    counting = CallCounter(pipe)
    with pytest.raises(RetryLimitExceeded) as error:
        generate_dataset(good_dir, str(tmp_path), pipe=counting, **arguments)
    assert counting.calls == 0
    assert error.value.summary.rejected == 0
    assert len(run_rejections(tmp_path)) == 4


class CallCounter:
    """The real pipeline, counting its calls."""

    def __init__(self, pipe):
        self.pipe, self.calls = pipe, 0

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def __call__(self, **kwargs):
        self.calls += 1
        return self.pipe(**kwargs)


class EmptyMasksForSeeds:
    """The real pipeline, reporting an empty mask for generations whose seed is listed."""

    def __init__(self, pipe, seeds):
        self.pipe, self.seeds = pipe, set(seeds)

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def __call__(self, **kwargs):
        output = self.pipe(**kwargs)
        output.empty_masks = [g.initial_seed() in self.seeds for g in kwargs["generator"]]
        return output


def test_rejection_empty_mask_retried(pipe, good_dir, tmp_path):
    first_seed = slot_seed(0, "crack", 1, 0)
    generate_dataset(good_dir, str(tmp_path), pipe=EmptyMasksForSeeds(pipe, [first_seed]), **SMALL_JOB)
    rejections = run_rejections(tmp_path)
    assert [(r["slot"], r["attempt"], r["reason"]) for r in rejections] == [(1, 0, "empty_mask")]
    assert [(r["slot"], r["attempt"]) for r in run_metadata(tmp_path)] == [(0, 0), (1, 1)]


def test_rejection_higher_retry_limit_on_resume(pipe, good_dir, tmp_path):
    output, fresh = tmp_path / "out", tmp_path / "fresh"
    # Slot 1 gets an empty mask on attempts 0 and 1, so a limit of one retry leaves it empty.
    wrapped = EmptyMasksForSeeds(pipe, [slot_seed(0, "crack", 1, attempt) for attempt in (0, 1)])
    with pytest.raises(RetryLimitExceeded) as error:
        generate_dataset(good_dir, str(output), pipe=wrapped, **{**SMALL_JOB, "max_retries": 1})
    assert error.value.summary.incomplete_slots == [("crack", 1)]
    summary = generate_dataset(good_dir, str(output), pipe=wrapped, **{**SMALL_JOB, "max_retries": 2})
    assert summary.written == 1
    assert [(r["slot"], r["attempt"]) for r in run_metadata(output)] == [(0, 0), (1, 2)]
    generate_dataset(good_dir, str(fresh), pipe=wrapped, **{**SMALL_JOB, "max_retries": 2})
    assert dataset_files(output) == dataset_files(fresh)


def test_cli_exit_code_on_exhausted_retries(tiny_model_dir, good_dir, tmp_path, capsys):
    code = main(["--input", good_dir, "--output", str(tmp_path), "--model", tiny_model_dir, "--object", "bottle",
                 "--defects", "crack", "--images-per-defect", "1", "--min-change", "1", "--max-retries", "0",
                 "--num-inference-steps", "6", "--strength", "0.8", "--no-progress", "--quiet"])
    captured = capsys.readouterr()
    assert code == 1
    assert "pairs complete: 0 of 1" in captured.out
    assert "error: 1 slot(s) got no generation" in captured.err


# ---------------------------------------------------------------------------
# Path safety


@pytest.mark.parametrize("category", ["", ".", "..", "a/b", "../up", "a\\b", " padded", "tab\tname", "deltadeno_runs"])
def test_category_not_plain_rejected(pipe, good_dir, tmp_path, category):
    with pytest.raises(DatasetGenerationError, match="category"):
        generate_dataset(good_dir, str(tmp_path), pipe=pipe, category=category, **SMALL_JOB)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("defects", [[""], [".."], ["a/b"], ["../crack"], ["crack", "crack"], ["=words"], []])
def test_defect_not_plain_rejected(pipe, good_dir, tmp_path, defects):
    with pytest.raises(DatasetGenerationError, match="defect"):
        generate_dataset(good_dir, str(tmp_path), pipe=pipe, **{**SMALL_JOB, "defects": defects})
    assert os.listdir(tmp_path) == []


def test_output_inside_input_rejected(pipe, tmp_path):
    good = tmp_path / "good"
    good.mkdir()
    textured_image(0).save(good / "000.png")
    before = folder_hashes(good)
    for output in (good, good / "synthetic", good / "a" / ".." / "b"):
        with pytest.raises(DatasetGenerationError, match="lies inside the input folder"):
            generate_dataset(str(good), str(output), pipe=pipe, **SMALL_JOB)
    assert folder_hashes(good) == before


def test_output_inside_input_through_symlink_rejected(pipe, tmp_path):
    good = tmp_path / "good"
    good.mkdir()
    textured_image(0).save(good / "000.png")
    (tmp_path / "link").symlink_to(good)
    with pytest.raises(DatasetGenerationError, match="lies inside the input folder"):
        generate_dataset(str(good), str(tmp_path / "link" / "out"), pipe=pipe, **SMALL_JOB)


def test_foreign_files_never_overwritten(pipe, good_dir, tmp_path):
    real = tmp_path / "bottle" / "test" / "crack"
    real.mkdir(parents=True)
    (real / "000.png").write_bytes(b"a real defect image")
    for overwrite in (False, True):
        with pytest.raises(DatasetGenerationError, match="already contains files"):
            generate_dataset(good_dir, str(tmp_path), pipe=pipe, overwrite=overwrite, **SMALL_JOB)
    assert (real / "000.png").read_bytes() == b"a real defect image"


# ---------------------------------------------------------------------------
# Bad inputs


def test_missing_input_folder(pipe, tmp_path):
    with pytest.raises(DatasetGenerationError, match=r"input folder .*missing.* was not found"):
        generate_dataset(str(tmp_path / "missing"), str(tmp_path / "out"), pipe=pipe, **SMALL_JOB)


def test_folder_without_images(pipe, tmp_path):
    good = tmp_path / "good"
    good.mkdir()
    (good / "notes.txt").write_text("no images here")
    with pytest.raises(DatasetGenerationError, match="no usable images"):
        generate_dataset(str(good), str(tmp_path / "out"), pipe=pipe, **SMALL_JOB)


def write_bad_images(folder):
    buffer = folder / "full.png"
    textured_image(9).save(buffer)
    (folder / "truncated.png").write_bytes(buffer.read_bytes()[:200])
    buffer.unlink()
    (folder / "not_an_image.png").write_text("plain text")
    textured_image(0, size=(64, 64)).save(folder / "large.png")


def test_bad_images_skipped_and_reported(pipe, tmp_path):
    good = tmp_path / "good"
    good.mkdir()
    write_bad_images(good)
    textured_image(1).save(good / "ok.png")
    summary = generate_dataset(str(good), str(tmp_path / "out"), pipe=pipe, max_pixels=32 * 32, **SMALL_JOB)
    reasons = {os.path.basename(path): reason for path, reason in summary.skipped_images}
    assert sorted(reasons) == ["large.png", "not_an_image.png", "truncated.png"]
    assert "exceeds the limit of 1024 pixels" in reasons["large.png"]
    assert "unreadable image" in reasons["truncated.png"]
    assert summary.complete == 2
    assert {os.path.basename(r["source_image"]) for r in run_metadata(tmp_path / "out")} == {"ok.png"}


def test_only_bad_images_rejected(pipe, tmp_path):
    good = tmp_path / "good"
    good.mkdir()
    write_bad_images(good)
    with pytest.raises(DatasetGenerationError, match=r"no usable images(.|\n)*truncated.png"):
        generate_dataset(str(good), str(tmp_path / "out"), pipe=pipe, max_pixels=32 * 32, **SMALL_JOB)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"images_per_defect": 0}, "images_per_defect must be >= 1; got 0"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"min_change": 1.5}, r"min_change must be in \[0.0, 1.0\]"),
        ({"layout": "coco"}, "layout must be one of"),
        ({"anomaly_prompt_template": "a photo of a {object}"}, "must contain {defect}"),
        ({"prompt_template": "a {color} {object}"}, r"uses the field\(s\) \['color'\]"),
        ({"prompt_template": "a photo of a {object"}, "not a valid format string"),
        ({"pipeline_kwargs": {"strength": 1.5}}, r"`strength` must be in \(0, 1\]; got 1.5"),
        ({"pipeline_kwargs": {"steps": 5}}, r"unsupported key\(s\) \['steps'\]"),
        ({"height": 33, "width": 32}, "multiple of the model's VAE scale factor 2"),
        ({"height": 32}, "pass both height and width"),
        ({"object_name": " "}, "object_name must be a non-empty string"),
    ],
)
def test_invalid_argument_rejected_before_output(pipe, good_dir, tmp_path, overrides, message):
    with pytest.raises(DatasetGenerationError, match=message):
        generate_dataset(good_dir, str(tmp_path / "out"), pipe=pipe, **{**SMALL_JOB, **overrides})
    assert not (tmp_path / "out").exists()


def test_mixed_sizes_need_height_and_width(pipe, tmp_path):
    good = tmp_path / "good"
    good.mkdir()
    textured_image(0).save(good / "a.png")
    textured_image(1, size=(48, 48)).save(good / "b.png")
    with pytest.raises(DatasetGenerationError, match=r"different sizes .*a.png is 32x32.*b.png is 48x48"):
        generate_dataset(str(good), str(tmp_path / "out"), pipe=pipe, **SMALL_JOB)
    summary = generate_dataset(str(good), str(tmp_path / "out"), pipe=pipe, height=32, width=32, **SMALL_JOB)
    assert PIL.Image.open(tmp_path / "out" / "bottle" / "test" / "crack" / "001.png").size == (32, 32)
    assert summary.complete == 2


@pytest.mark.parametrize("device, message", [("gpu", "is not a torch device"), ("cuda:0", "needs CUDA")])
def test_invalid_device_rejected(pipe, good_dir, tmp_path, device, message):
    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(DatasetGenerationError, match=message):
        generate_dataset(good_dir, str(tmp_path / "out"), device=device, **SMALL_JOB)
    assert not (tmp_path / "out").exists()


def test_missing_model_folder(good_dir, tmp_path):
    with pytest.raises(DatasetGenerationError, match="model folder './no_such_model' was not found"):
        generate_dataset(good_dir, str(tmp_path / "out"), model="./no_such_model", **SMALL_JOB)


def test_missing_bundled_model(good_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(deltadeno_generate, "BUNDLED_MODEL_DIR", str(tmp_path / "absent"))
    with pytest.raises(DatasetGenerationError, match="pass --model"):
        generate_dataset(good_dir, str(tmp_path / "out"), **SMALL_JOB)


# ---------------------------------------------------------------------------
# Command line, installation and several processes


def test_cli_help_lists_pipeline_arguments(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for option in ("--images-per-defect", "--layout", "--batch-size", "--min-change", "--attribution-fraction",
                   "--mask-threshold-method", "--normal-as-negative"):
        assert option in help_text


def test_cli_invalid_argument_exit_code(good_dir, tmp_path, capsys):
    code = main(["--input", good_dir, "--output", str(tmp_path), "--object", "bottle", "--defects", "a/b"])
    assert code == 2
    assert "error: defect name must be a plain folder name" in capsys.readouterr().err


def test_installed_command_without_bundled_model(good_dir, tmp_path, installed_site):
    target = Path(installed_site)
    command = target / "bin" / "deltadeno-generate"
    assert command.is_file()
    environment = dict(subprocess_environment(), PYTHONPATH=str(target))
    result = subprocess.run(
        [sys.executable, str(command), "--input", good_dir, "--output", str(tmp_path / "out"), "--object", "bottle",
         "--defects", "crack"],
        cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "bundled small model was not found" in result.stderr
    assert "pass --model" in result.stderr
    assert not (tmp_path / "out").exists()


def test_torchrun_two_processes_equal_single(reference, good_dir, tiny_model_dir, tmp_path):
    output = tmp_path / "out"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
        "--master-addr", "127.0.0.1", "--master-port", str(free_local_port()),
        "-m", "deltadeno_generate", "--input", good_dir, "--output", str(output), "--model", tiny_model_dir,
        *CLI_JOB,
    ]
    result = subprocess.run(command, env=subprocess_environment(), cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    shards = sorted(os.listdir(output / "deltadeno_runs" / "bottle" / "shards"))
    assert shards == ["metadata-rank0.jsonl", "metadata-rank1.jsonl", "rejections-rank0.jsonl",
                      "rejections-rank1.jsonl"]
    # Each process wrote its own blocks: 4 blocks of 2, 2 and 1 slots split 2 and 2.
    for rank in (0, 1):
        assert read_jsonl(str(output / "deltadeno_runs" / "bottle" / "shards" / f"metadata-rank{rank}.jsonl"))
    assert result.stdout.count("pairs complete: 6 of 6") == 1
    assert dataset_files(output) == dataset_files(reference[0])

    # A resume with other arguments stops both processes with the main process's error.
    command[command.index("--master-port") + 1] = str(free_local_port())
    changed = subprocess.run([*command, "--seed", "1"], env=subprocess_environment(), cwd=REPO_ROOT,
                             capture_output=True, text=True, timeout=300)
    assert changed.returncode != 0
    assert "seed: 0 stored, 1 now" in changed.stderr
    assert "process 0 stopped the job" in changed.stderr
    assert "[rank1]: Traceback" not in changed.stderr
    assert dataset_files(output) == dataset_files(reference[0])


# ---------------------------------------------------------------------------
# The bundled small model

EXAMPLES_DIR = os.path.join(REPO_ROOT, "examples", "images")
# The small model was trained on captions like "a photo of brick with a scratch".
BRICK_JOB = dict(
    object_name="brick",
    defects=["hole", "scratch"],
    images_per_defect=3,
    pattern="brick_*.png",
    prompt_template="a photo of {object}",
    anomaly_prompt_template="a photo of {object} with a {defect}",
    batch_size=2,
    pipeline_kwargs={"num_inference_steps": 20},
    progress=False,
)
needs_small_model = pytest.mark.skipif(not os.path.isdir(SMALL_MODEL_DIR), reason="the small model is not trained yet")


@pytest.fixture(scope="module")
def brick_reference(tmp_path_factory):
    """The brick job on the bundled small model, which `generate_dataset` uses without `model` or `pipe`."""
    output = str(tmp_path_factory.mktemp("brick"))
    summary = generate_dataset(EXAMPLES_DIR, output, **BRICK_JOB)
    return output, summary


@pytest.fixture(scope="module")
def small_pipe():
    pipe = DeltaDenoPipeline.from_pretrained(SMALL_MODEL_DIR)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@needs_small_model
def test_small_model_defects_inside_masks(brick_reference):
    output, summary = brick_reference
    assert summary.complete == 6
    records = run_metadata(output, "brick")
    assert {record["model"] for record in records} == {SMALL_MODEL_DIR}
    for record in records:
        assert record["mask_change"] >= deltadeno_generate.DEFAULT_MIN_CHANGE
        assert os.path.basename(record["source_image"]).startswith("brick_")
        mask = np.asarray(PIL.Image.open(os.path.join(output, record["mask"]))) > 127
        image = np.asarray(PIL.Image.open(os.path.join(output, record["image"]))).astype(np.int16)
        source = np.asarray(PIL.Image.open(record["source_image"]).convert("RGB")).astype(np.int16)
        change = np.abs(image - source).max(axis=-1)
        # Pixels beyond the feather (3 sigma = 3 pixels around the mask) keep the input's values.
        near = np.asarray(PIL.Image.fromarray(mask.astype(np.uint8) * 255).filter(PIL.ImageFilter.MaxFilter(9))) > 0
        assert not change[~near].any()
        assert change[mask].mean() > 4 * change[~mask].mean()


@needs_small_model
@pytest.mark.parametrize("damage", [torn_last_record, lost_last_record])
def test_small_model_resume_byte_identical(brick_reference, small_pipe, tmp_path, damage):
    output = tmp_path / "out"
    shutil.copytree(brick_reference[0], output)
    damage(output, "brick")
    generate_dataset(EXAMPLES_DIR, str(output), pipe=small_pipe, **BRICK_JOB)
    assert dataset_files(output) == dataset_files(brick_reference[0])


@needs_small_model
def test_small_model_seas_layout(brick_reference, small_pipe, tmp_path):
    generate_dataset(EXAMPLES_DIR, str(tmp_path), pipe=small_pipe, layout="seas", **BRICK_JOB)
    for defect in ("hole", "scratch"):
        for slot in range(3):
            mvtec_image = os.path.join(brick_reference[0], "brick", "test", defect, f"{slot:03d}.png")
            seas_image = tmp_path / "brick" / defect / "image" / f"{slot}.png"
            assert seas_image.read_bytes() == open(mvtec_image, "rb").read()
