"""Generate a detector-ready anomaly dataset from a folder of defect-free images with DeltaDeno.

    deltadeno-generate --input mvtec/bottle --output synthetic --object bottle \\
        --defects crack "broken_large=large break" --images-per-defect 100

writes `synthetic/bottle/test/<defect>/000.png` and
`synthetic/bottle/ground_truth/<defect>/000_mask.png` (or the AnomalyDiffusion /
SeaS layout with `--layout seas`), and beside the dataset, in
`synthetic/deltadeno_runs/bottle/`: `metadata.jsonl` with one record per pair,
`rejections.jsonl` with every rejected generation, and `previews/<defect>.png`.

The job is resumable: run the same command again after a crash and it
completes the missing pairs, and the result equals that of an uninterrupted
run byte for byte on the same hardware and software. This works because the
pair in slot `i` of a defect depends only on the arguments and `i`. Its source
image is `images[i % len(images)]`, and its seed is derived from the base
seed, the defect, `i` and the retry number. Generations are batched in fixed
blocks of `--batch-size` consecutive slots. Under `torchrun` or `accelerate
launch` the blocks are split between the processes, so each process writes
other files. The same job is importable as the function `generate_dataset`.
"""

from __future__ import annotations

import argparse
import configparser
import datetime
import hashlib
import inspect
import json
import logging as python_logging
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata

import diffusers
import numpy as np
import PIL.Image
import torch
import transformers
from diffusers.utils import logging

if __package__:
    from .deltadeno_dataset import (
        DEFAULT_MAX_PIXELS, LAYOUTS, RUNS_FOLDER, DatasetFolder, DatasetGenerationError, JsonlAppender,
        check_plain_name, find_source_folder, is_inside, load_object_mask, scan_source_images, write_png_atomic,
        write_preview,
    )
    from .pipeline_deltadeno import END_TOKEN_SOURCES, THRESHOLD_METHODS, DeltaDenoPipeline, image_to_tensor
else:
    from deltadeno_dataset import (
        DEFAULT_MAX_PIXELS, LAYOUTS, RUNS_FOLDER, DatasetFolder, DatasetGenerationError, JsonlAppender,
        check_plain_name, find_source_folder, is_inside, load_object_mask, scan_source_images, write_png_atomic,
        write_preview,
    )
    from pipeline_deltadeno import END_TOKEN_SOURCES, THRESHOLD_METHODS, DeltaDenoPipeline, image_to_tensor

logger = logging.get_logger(__name__)

MODULE_DIR = os.path.dirname(os.path.abspath(__file__))
# Present in a source checkout only; a pip-installed copy has no bundled model.
BUNDLED_MODEL_DIR = os.path.join(MODULE_DIR, "small_model", "deltadeno-small")
DEFAULT_PROMPT_TEMPLATE = "a photo of a {object}"
DEFAULT_ANOMALY_PROMPT_TEMPLATE = "a photo of a {object} with a {defect}"
# Mean absolute change inside the mask, in [0, 1] pixel units, below which a generation counts as
# "no visible defect". 0.02 is about 5 grey levels of 255. On the bundled small model (the 9 held-out
# example images x hole, scratch and stain, pipeline defaults, CPU) all 27 generations changed
# 0.10-0.41, so this floor only catches regions left nearly as they were.
# NOTE: not calibrated on real Stable Diffusion checkpoints, where a visible defect may change less.
DEFAULT_MIN_CHANGE = 0.02
DEFAULT_MAX_RETRIES = 3
# Barriers wait for the slowest process; with uneven retries that can take hours on large jobs.
BARRIER_TIMEOUT = datetime.timedelta(hours=48)

# DeltaDenoPipeline.__call__ arguments that the job passes through: name -> (type, help).
PIPELINE_ARGUMENTS = {
    "num_inference_steps": (int, "scheduler steps of the full schedule; strength x steps are run"),
    "strength": (float, "how far each image is noised, in (0, 1]"),
    "guidance_scale": (float, "classifier-free guidance weight; <= 1 turns guidance off"),
    "attribution_fraction": (float, "share of the denoising steps that locate the defect, in (0, 1)"),
    "mask_threshold_method": (str, "rule that turns the localization map into the mask"),
    "mask_threshold": (float, "quantile or absolute level in [0, 1] of that rule"),
    "min_area_fraction": (float, "smallest mask area, as a fraction of the image"),
    "max_area_fraction": (float, "largest mask area, as a fraction of the image"),
    "mask_dilation": (int, "mask dilation in latent pixels"),
    "mask_max_components": (int, "connected mask regions kept, strongest first; 0 keeps all"),
    "mask_blur_sigma": (float, "Gaussian smoothing of the map before thresholding, in latent pixels"),
    "anomaly_token_weight": (float, "factor on the embedding rows of the defect words, > 0"),
    "end_token_source": (str, "prompt that gives the refined anomaly embedding its end-of-text rows"),
    "attention_bias_inside": (float, "cross-attention logit bias of the defect words inside the mask"),
    "attention_bias_outside": (float, "cross-attention logit bias of the defect words outside the mask"),
    "normal_as_negative": (bool, "guide the locating steps with the normal prompt as negative (2 UNet "
                           "conditions instead of 3)"),
    "feather_sigma": (float, "Gaussian feather of the pasting mask in image pixels; unset means "
                      "vae_scale_factor / 2"),
    "eta": (float, "DDIM eta; other schedulers ignore it"),
    "clip_skip": (int, "final CLIP text-encoder layers to skip"),
}
PIPELINE_CHOICES = {"mask_threshold_method": THRESHOLD_METHODS, "end_token_source": END_TOKEN_SOURCES}


def pipeline_defaults() -> dict:
    """Return the `DeltaDenoPipeline.__call__` defaults of the arguments in `PIPELINE_ARGUMENTS`."""
    parameters = inspect.signature(DeltaDenoPipeline.__call__).parameters
    return {name: parameters[name].default for name in PIPELINE_ARGUMENTS}


class RetryLimitExceeded(DatasetGenerationError):
    """Raised after the job when some slots got no accepted generation within `max_retries` retries."""

    def __init__(self, message: str, summary: GenerationSummary):
        super().__init__(message)
        self.summary = summary


@dataclass
class GenerationSummary:
    """Counts of one `generate_dataset` call, over all of its processes."""

    requested: int
    complete: int
    written: int  # pairs written by this call
    rejected: int  # generations rejected by this call
    incomplete_slots: list[tuple[str, int]]  # (defect, slot) without an accepted generation
    skipped_images: list[tuple[str, str]]  # (path, reason)
    seconds: float
    metadata_path: str
    rejections_path: str
    preview_paths: list[str] = field(default_factory=list)

    def format(self) -> str:
        per_pair = f" ({self.seconds / self.written:.2f} s per written pair)" if self.written else ""
        lines = [
            f"pairs complete: {self.complete} of {self.requested} ({self.written} written by this run)",
            f"rejected generations: {self.rejected} in this run, listed in {self.rejections_path}",
            f"skipped input images: {len(self.skipped_images)}",
            f"time: {self.seconds:.1f} s{per_pair}",
            f"metadata: {self.metadata_path}",
        ]
        lines += [f"preview: {path}" for path in self.preview_paths]
        if self.incomplete_slots:
            listed = ", ".join(f"{defect} {slot}" for defect, slot in self.incomplete_slots[:10])
            more = " ..." if len(self.incomplete_slots) > 10 else ""
            lines.append(f"slots without an accepted generation: {len(self.incomplete_slots)} ({listed}{more})")
        return "\n".join(lines)


@dataclass(frozen=True)
class DefectSpec:
    """One defect: its folder name, the words used in the prompt, and both prompts."""

    name: str
    words: str
    prompt: str
    anomaly_prompt: str


def slot_seed(base_seed: int, defect: str, slot: int, attempt: int) -> int:
    """Return the 63-bit generator seed of one attempt at one slot; it depends on nothing else."""
    digest = hashlib.sha256(f"deltadeno-generate:{base_seed}:{defect}:{slot}:{attempt}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def software_versions() -> dict:
    """Return the versions of the software whose behaviour decides the generated bytes."""
    try:
        deltadeno_version = importlib_metadata.version("deltadeno")
    except importlib_metadata.PackageNotFoundError:
        # A source checkout that is not pip-installed: take the version from setup.cfg beside us.
        parser = configparser.ConfigParser()
        parser.read(os.path.join(MODULE_DIR, "setup.cfg"))
        deltadeno_version = parser.get("metadata", "version", fallback="unknown") + " (source checkout)"
    return {
        "deltadeno": deltadeno_version,
        "diffusers": diffusers.__version__,
        "numpy": np.__version__,
        "pillow": PIL.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


# ----------------------------------------------------------------------------
# Argument checks


def _parse_defects(defects: list[str], object_name: str, prompt_template: str, anomaly_template: str) -> list[DefectSpec]:
    if isinstance(defects, str) or not defects:
        raise DatasetGenerationError(f"defects must be a non-empty list of defect names; got {defects!r}.")
    specs, seen = [], set()
    for entry in defects:
        name, _, words = str(entry).partition("=")
        check_plain_name(name, "defect name")
        words = words.strip() or name
        if name in seen:
            raise DatasetGenerationError(f"defect {name!r} is listed twice; list each defect once.")
        seen.add(name)
        specs.append(
            DefectSpec(
                name,
                words,
                _fill_template(prompt_template, "prompt_template", object_name, words),
                _fill_template(anomaly_template, "anomaly_prompt_template", object_name, words),
            )
        )
    return specs


def _fill_template(template: str, argument: str, object_name: str, defect_words: str) -> str:
    import string

    allowed = {"object"} if argument == "prompt_template" else {"object", "defect"}
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as error:
        raise DatasetGenerationError(f"{argument} {template!r} is not a valid format string: {error}.") from error
    unknown = fields - allowed
    if unknown:
        raise DatasetGenerationError(
            f"{argument} {template!r} uses the field(s) {sorted(unknown)}; it may use only "
            f"{' and '.join('{' + name + '}' for name in sorted(allowed))}."
        )
    if argument == "anomaly_prompt_template" and "defect" not in fields:
        raise DatasetGenerationError(f"{argument} {template!r} must contain {{defect}}.")
    return template.format(object=object_name, defect=defect_words)


def _check_number(value, argument: str, minimum, maximum=None, kind=int):
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise DatasetGenerationError(f"{argument} must be {'a number' if kind is float else 'an integer'}; got {value!r}.")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"in [{minimum}, {maximum}]" if maximum is not None else f">= {minimum}"
        raise DatasetGenerationError(f"{argument} must be {bound}; got {value!r}.")
    return value


def _resolve_model(model: str | None) -> str:
    if model is None:
        if not os.path.isdir(BUNDLED_MODEL_DIR):
            raise DatasetGenerationError(
                f"no model given and the bundled small model was not found at {BUNDLED_MODEL_DIR} (it ships with "
                "the source checkout only); pass --model with a Hugging Face Hub id or a local Stable Diffusion "
                "folder, e.g. --model stable-diffusion-v1-5/stable-diffusion-v1-5."
            )
        return BUNDLED_MODEL_DIR
    if os.path.exists(model):
        return os.path.abspath(model)
    # Hub ids have the form "name" or "owner/name"; anything else is meant as a folder.
    if model.startswith((".", "/", "~")) or model.count("/") > 1 or (os.sep != "/" and os.sep in model):
        raise DatasetGenerationError(f"model folder {model!r} was not found; pass a local folder or a Hub id.")
    return model


# ----------------------------------------------------------------------------
# Processes


class _Processes:
    """This job's processes: this one alone, or all started by `torchrun` / `accelerate launch`."""

    def __init__(self, device: str):
        self.state = None
        self.created = False
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size <= 1:
            self.rank, self.world_size, self.is_main = 0, 1, True
            if device == "auto":
                device = "cuda" if torch.cuda.is_available() else "cpu"
            try:
                self.device = torch.device(device)
            except RuntimeError as error:
                raise DatasetGenerationError(f"device {device!r} is not a torch device: {error}") from error
            if self.device.type == "cuda" and not torch.cuda.is_available():
                raise DatasetGenerationError(f"device {device!r} needs CUDA, which this torch build or machine lacks.")
            return
        try:
            from accelerate import PartialState
        except ImportError as error:
            raise DatasetGenerationError(
                f"WORLD_SIZE={world_size}: running in several processes needs Hugging Face Accelerate; "
                "install it with `pip install deltadeno[multi]` or run a single process."
            ) from error
        if device not in ("auto", "cpu"):
            raise DatasetGenerationError(
                f"device {device!r}: under torchrun or accelerate launch each process takes its own device; "
                "pass device 'auto' (one GPU per process, or the CPU without CUDA) or 'cpu'."
            )
        self.created = not torch.distributed.is_initialized()
        # Without cpu=True, PartialState on a machine without CUDA does not join the other processes.
        cpu = device == "cpu" or not torch.cuda.is_available()
        self.state = PartialState(cpu=cpu, timeout=BARRIER_TIMEOUT)
        self.rank, self.world_size = self.state.process_index, self.state.num_processes
        self.is_main = self.state.is_main_process
        self.device = torch.device("cpu") if cpu else self.state.device

    def wait(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()

    def broadcast_from_main(self, value):
        """Return the main process's `value` in every process (a picklable object)."""
        if self.state is None:
            return value
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([value], from_process=0)[0]

    def split(self, items: list) -> list:
        """Return this process's contiguous share of `items`; every process must pass the same list."""
        if self.state is None:
            return list(items)
        with self.state.split_between_processes(list(items)) as share:
            return list(share)

    def close(self) -> None:
        if self.created and self.state is not None:
            self.state.destroy_process_group()


# ----------------------------------------------------------------------------
# The job


@dataclass
class _Job:
    """Everything that decides the generated files, resolved from `generate_dataset`'s arguments."""

    folder: DatasetFolder
    defects: list[DefectSpec]
    images_per_defect: int
    seed: int
    sources: list
    image_size: tuple[int, int]  # (width, height) of the generated images
    negative_prompt: str | None
    pipeline_arguments: dict
    min_change: float
    max_retries: int
    batch_size: int
    record_context: dict  # model, dtype, device type, versions: the same in every record


def generate_dataset(
    input_dir: str,
    output_dir: str,
    object_name: str,
    defects: list[str],
    images_per_defect: int = 10,
    *,
    seed: int = 0,
    category: str | None = None,
    layout: str = "mvtec",
    model: str | None = None,
    pipe: DeltaDenoPipeline | None = None,
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
    anomaly_prompt_template: str = DEFAULT_ANOMALY_PROMPT_TEMPLATE,
    negative_prompt: str | None = None,
    object_mask_dir: str | None = None,
    pattern: str = "*",
    height: int | None = None,
    width: int | None = None,
    batch_size: int = 1,
    min_change: float = DEFAULT_MIN_CHANGE,
    max_retries: int = DEFAULT_MAX_RETRIES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    pipeline_kwargs: dict | None = None,
    dtype: str = "auto",
    device: str = "auto",
    trust_remote_code: bool = False,
    overwrite: bool = False,
    preview_count: int = 8,
    progress: bool = True,
) -> GenerationSummary:
    """Generate `images_per_defect` (image, mask) pairs for each defect, resuming an earlier run.

    Args:
        input_dir: folder of defect-free images, or an MVTec AD category (images in `train/good/`).
        output_dir: dataset root; it must not lie inside `input_dir`.
        object_name: the part's name in the prompts, e.g. "bottle".
        defects: defect names, used as folder names and in the anomaly prompt; "name=words" uses
            other words in the prompt, e.g. "broken_large=large break".
        images_per_defect: pairs per defect, >= 1.
        seed: base seed; each slot's seed is derived from it (see `slot_seed`).
        category: folder name of the category; default the MVTec AD category folder's name, or `object_name`.
        layout: "mvtec" (`<category>/test/<defect>/000.png`, `<category>/ground_truth/<defect>/000_mask.png`)
            or "seas" (`<category>/<defect>/image/0.png`, `<category>/<defect>/mask/0.png`).
        model: Hub id or local Stable Diffusion folder; default the bundled small model.
        pipe: an already loaded `DeltaDenoPipeline` to use instead of `model` (placed on its device by the caller).
        prompt_template, anomaly_prompt_template: prompts with `{object}` and (anomaly only) `{defect}` fields.
        negative_prompt: prompt of the unconditional branch; default empty.
        object_mask_dir: folder with one mask of the part per image, with the image's file name or stem.
            Defects are confined to the part. Images without a usable mask are skipped.
        pattern: shell pattern that the image file names must match, e.g. "brick_*.png".
        height, width: resize the images to this size before generation (both or neither).
        batch_size: slots per pipeline call. Part of the run's identity: batched and single calls differ
            in the last bits, so a resumed run must use the same value.
        min_change: generations whose mean absolute change inside the mask is below this (pixel units in
            [0, 1]) are rejected, as are those with an empty mask.
        max_retries: rejected slots are retried with new seeds up to this many times. A resumed run may
            use another value; a higher one retries the slots that exhausted the old one.
        max_pixels: larger input images are skipped, checked before decoding.
        pipeline_kwargs: `DeltaDenoPipeline.__call__` arguments named in `PIPELINE_ARGUMENTS`.
        dtype: "auto" (float16 on CUDA, float32 otherwise), "float32", "float16" or "bfloat16".
        device: "auto" or a torch device; under torchrun / accelerate launch "auto" or "cpu".
        trust_remote_code: let diffusers run pipeline code stored in the model folder or Hub repo.
        overwrite: delete this category's pairs and records from an earlier run and start anew. Files
            that the earlier run did not name are never deleted.
        preview_count: pairs shown per defect in the preview grid; 0 writes none.
        progress: show a progress bar (main process only).

    Returns:
        `GenerationSummary`.

    Raises:
        DatasetGenerationError: invalid arguments, inputs or output folder, before any pair is generated.
        RetryLimitExceeded: after the job, when some slots have no accepted generation; `.summary` is attached.
    """
    started = time.monotonic()

    # 1. Check the arguments, the folders and the input images; bad images are skipped and reported
    _check_settings(
        object_name, images_per_defect, seed, batch_size, max_retries, max_pixels, preview_count, min_change,
        layout, height, width, dtype, pipeline_kwargs,
    )
    if pipe is not None and model is not None:
        raise DatasetGenerationError("pass either model or pipe, not both.")
    defect_specs = _parse_defects(defects, object_name, prompt_template, anomaly_prompt_template)
    source_folder, category = _check_folders(input_dir, output_dir, object_mask_dir, category, object_name)
    sources, skipped, image_size = _find_sources(source_folder, pattern, max_pixels, object_mask_dir, height, width)

    processes = _Processes(device)
    lock = None
    try:
        # 2. Load the pipeline and check the pipeline arguments before the output folder is touched
        if pipe is None:
            pipe, model_id = _load_pipeline(_resolve_model(model), dtype, processes.device, trust_remote_code)
        else:
            model_id = getattr(pipe, "name_or_path", None) or type(pipe).__name__
        arguments = _resolve_pipeline_arguments(pipe, pipeline_kwargs or {}, height, width)
        _check_pipeline_arguments(pipe, arguments, image_size, defect_specs[0], negative_prompt)

        job = _Job(
            folder=DatasetFolder(os.path.abspath(output_dir), category, layout,
                                 tuple(spec.name for spec in defect_specs), images_per_defect),
            defects=defect_specs,
            images_per_defect=images_per_defect,
            seed=seed,
            sources=sources,
            image_size=image_size,
            negative_prompt=negative_prompt,
            pipeline_arguments=arguments,
            min_change=float(min_change),
            max_retries=max_retries,
            batch_size=batch_size,
            record_context={
                "model": model_id,
                "dtype": str(pipe.unet.dtype).replace("torch.", ""),
                "device_type": pipe.device.type,
                "versions": software_versions(),
            },
        )
        run_arguments = _run_arguments(job, os.path.abspath(input_dir), pattern, object_mask_dir)

        # 3. The main process checks the output folder against the stored run and repairs what a
        # killed run left. The others wait for its outcome, so that all of them read the same state.
        failure = None
        if processes.is_main:
            try:
                lock = job.folder.lock()
                job.folder.prepare(run_arguments, job.record_context["versions"], overwrite)
            except DatasetGenerationError as error:
                failure = error
        failure_message = processes.broadcast_from_main(None if failure is None else str(failure))
        if failure is not None:
            raise failure
        if failure_message is not None:
            raise DatasetGenerationError(f"process 0 stopped the job: {failure_message}")
        done, rejection_keys = job.folder.read_progress()
        done_before, rejected_before = len(done), len(rejection_keys)

        # 4. Generate the blocks with unsettled slots, this process's share of them. A slot is settled
        # when its pair is complete or all of its attempts were rejected.
        def unsettled(name: str, slot: int) -> bool:
            exhausted = all((name, slot, attempt) in rejection_keys for attempt in range(max_retries + 1))
            return (name, slot) not in done and not exhausted

        blocks = [(spec, slots) for spec, slots in _blocks(job) if any(unsettled(spec.name, s) for s in slots)]
        my_blocks = processes.split(blocks)
        pending = sum(unsettled(spec.name, slot) for spec, slots in my_blocks for slot in slots)
        if processes.is_main and done_before:
            logger.info("Resuming %s: %d of %d pairs already complete.", job.folder.run_dir, done_before,
                        len(defect_specs) * images_per_defect)
        shard_name = f"rank{processes.rank}.jsonl"
        os.makedirs(os.path.join(job.folder.run_dir, "shards"), exist_ok=True)
        records = JsonlAppender(os.path.join(job.folder.run_dir, "shards", "metadata-" + shard_name))
        rejections = JsonlAppender(os.path.join(job.folder.run_dir, "shards", "rejections-" + shard_name))
        from tqdm import tqdm

        description = category if processes.world_size == 1 else f"{category} (process 0 of {processes.world_size})"
        bar = tqdm(total=pending, unit="pair", desc=description, disable=not (progress and processes.is_main))
        try:
            for spec, slots in my_blocks:
                _generate_block(pipe, job, spec, slots, done, rejection_keys, records, rejections, bar)
        finally:
            bar.close()
            records.close()
            rejections.close()

        # 5. Merge the records and draw the previews once every process has finished
        processes.wait()
        done, rejection_keys = job.folder.read_progress()
        preview_paths = []
        if processes.is_main:
            job.folder.merge_records()
            if preview_count:
                preview_paths = _write_previews(job, done, preview_count)
        processes.wait()
    finally:
        if lock is not None:
            lock.close()
        processes.close()

    incomplete = [(spec.name, slot) for spec in defect_specs for slot in range(images_per_defect)
                  if (spec.name, slot) not in done]
    summary = GenerationSummary(
        requested=len(defect_specs) * images_per_defect,
        complete=len(done),
        written=len(done) - done_before,
        rejected=len(rejection_keys) - rejected_before,
        incomplete_slots=incomplete,
        skipped_images=skipped,
        seconds=time.monotonic() - started,
        metadata_path=os.path.join(job.folder.run_dir, "metadata.jsonl"),
        rejections_path=os.path.join(job.folder.run_dir, "rejections.jsonl"),
        preview_paths=preview_paths,
    )
    if incomplete:
        raise RetryLimitExceeded(
            f"{len(incomplete)} slot(s) got no generation with a non-empty mask and a change of at least "
            f"{job.min_change} within {job.max_retries} retries (see {summary.rejections_path}). Rerun with "
            "a higher max_retries to retry only these slots, or start anew (overwrite) with a lower min_change "
            "or other pipeline arguments.",
            summary,
        )
    return summary


def _check_settings(object_name, images_per_defect, seed, batch_size, max_retries, max_pixels, preview_count,
                    min_change, layout, height, width, dtype, pipeline_kwargs) -> None:
    if not isinstance(object_name, str) or not object_name.strip():
        raise DatasetGenerationError(f"object_name must be a non-empty string; got {object_name!r}.")
    _check_number(images_per_defect, "images_per_defect", 1)
    _check_number(seed, "seed", 0)
    _check_number(batch_size, "batch_size", 1)
    _check_number(max_retries, "max_retries", 0)
    _check_number(max_pixels, "max_pixels", 1)
    _check_number(preview_count, "preview_count", 0)
    _check_number(min_change, "min_change", 0.0, 1.0, kind=float)
    if layout not in LAYOUTS:
        raise DatasetGenerationError(f"layout must be one of {LAYOUTS}; got {layout!r}.")
    if (height is None) != (width is None):
        raise DatasetGenerationError(f"pass both height and width or neither; got height={height}, width={width}.")
    if height is not None:
        _check_number(height, "height", 1)
        _check_number(width, "width", 1)
    if dtype not in ("auto", "float32", "float16", "bfloat16"):
        raise DatasetGenerationError(f"dtype must be auto, float32, float16 or bfloat16; got {dtype!r}.")
    unknown = sorted(set(pipeline_kwargs or {}) - set(PIPELINE_ARGUMENTS))
    if unknown:
        raise DatasetGenerationError(
            f"pipeline_kwargs has unsupported key(s) {unknown}; supported: {sorted(PIPELINE_ARGUMENTS)}."
        )


def _check_folders(input_dir: str, output_dir: str, object_mask_dir: str | None, category: str | None,
                   object_name: str) -> tuple[str, str]:
    """Return the folder of the good images and the category name, after the path-safety checks."""
    source_folder, is_mvtec = find_source_folder(input_dir)
    if category is None:
        category = os.path.basename(os.path.normpath(os.path.abspath(input_dir))) if is_mvtec else object_name
    check_plain_name(category, "category")
    if category == RUNS_FOLDER:
        raise DatasetGenerationError(f"category {category!r} is reserved for the job's records; choose another.")
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise DatasetGenerationError(f"output {output_dir!r} exists and is not a folder.")
    for folder, argument in ((input_dir, "the input folder"), (object_mask_dir, "the object mask folder")):
        if folder is not None and is_inside(output_dir, folder):
            raise DatasetGenerationError(
                f"output folder {output_dir!r} lies inside {argument} {folder!r}; choose an output folder "
                "outside it, so that the input is never modified."
            )
    if object_mask_dir is not None and not os.path.isdir(object_mask_dir):
        raise DatasetGenerationError(f"object mask folder {object_mask_dir!r} was not found.")
    return source_folder, category


def _find_sources(source_folder: str, pattern: str, max_pixels: int, object_mask_dir: str | None,
                  height: int | None, width: int | None) -> tuple[list, list, tuple[int, int]]:
    """Return the usable images, the skipped ones as (path, reason), and the (width, height) to generate."""
    sources, skipped = scan_source_images(source_folder, pattern, max_pixels, object_mask_dir)
    for path, reason in skipped:
        logger.warning("Skipping input image %s: %s.", path, reason)
    if not sources:
        details = "".join(f"\n  {path}: {reason}" for path, reason in skipped[:10])
        raise DatasetGenerationError(
            f"no usable images matching {pattern!r} in {source_folder!r} (accepted extensions .png, .jpg, "
            f".jpeg, .bmp, .tif, .tiff, .webp).{details}"
        )
    if height is not None:
        return sources, skipped, (width, height)
    sizes = sorted({source.size for source in sources})
    if len(sizes) > 1:
        examples = [f"{next(s.path for s in sources if s.size == size)} is {size[0]}x{size[1]}" for size in sizes[:2]]
        raise DatasetGenerationError(
            f"the input images have different sizes ({', '.join(examples)}); pass height and width to resize "
            "them all to one size."
        )
    return sources, skipped, sizes[0]


def _load_pipeline(model: str, dtype: str, device: torch.device, trust_remote_code: bool):
    if dtype == "auto":
        dtype = "float16" if device.type == "cuda" else "float32"
    try:
        pipe = DeltaDenoPipeline.from_pretrained(
            model, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as error:
        raise DatasetGenerationError(f"failed to load the model {model!r}: {error}") from error
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device), model


def _resolve_pipeline_arguments(pipe, pipeline_kwargs: dict, height: int | None, width: int | None) -> dict:
    arguments = pipeline_defaults()
    arguments.update({name: value for name, value in pipeline_kwargs.items() if value is not None})
    if arguments["feather_sigma"] is None:
        arguments["feather_sigma"] = pipe.vae_scale_factor / 2
    arguments["height"], arguments["width"] = height, width
    return arguments


def _check_pipeline_arguments(pipe, arguments: dict, image_size: tuple[int, int], spec: DefectSpec, negative_prompt):
    multiple = pipe.vae_scale_factor
    width, height = image_size
    if width % multiple or height % multiple:
        kind = "height and width" if arguments["height"] is not None else "the input images' size"
        raise DatasetGenerationError(
            f"{kind} {width}x{height} (width x height) must be a multiple of the model's VAE scale factor "
            f"{multiple}; pass height and width that are."
        )
    checked = {name: arguments[name] for name in inspect.signature(pipe.check_inputs).parameters if name in arguments}
    try:
        pipe.check_inputs(
            images=[torch.zeros(3, height, width)], prompts=[spec.prompt], anomaly_prompts=[spec.anomaly_prompt],
            negative_prompt=negative_prompt, has_mask_image=False, output_type="pil", num_images_per_prompt=1,
            prompt_embeds=None, negative_prompt_embeds=None, anomaly_prompt_embeds=None,
            callback_on_step_end_tensor_inputs=["latents"], **checked,
        )
    except (ValueError, TypeError) as error:
        raise DatasetGenerationError(f"invalid pipeline argument: {error}") from error


def _run_arguments(job: _Job, input_dir: str, pattern: str, object_mask_dir: str | None) -> dict:
    """Return everything that decides the generated files, in JSON form; a resumed run must match it.

    `max_retries` is left out: attempt `r` of a block runs the same batch whatever the limit, so a
    resumed run may raise the limit to retry the slots that exhausted it.
    """
    arguments = {
        "input_dir": input_dir,
        "pattern": pattern,
        "object_mask_dir": None if object_mask_dir is None else os.path.abspath(object_mask_dir),
        "sources": [[s.path, s.sha256, s.object_mask_sha256] for s in job.sources],
        "layout": job.folder.layout,
        "defects": [[spec.name, spec.prompt, spec.anomaly_prompt] for spec in job.defects],
        "images_per_defect": job.images_per_defect,
        "seed": job.seed,
        "negative_prompt": job.negative_prompt,
        "image_size": list(job.image_size),
        "pipeline_arguments": job.pipeline_arguments,
        "min_change": job.min_change,
        "batch_size": job.batch_size,
        "model": job.record_context["model"],
        "dtype": job.record_context["dtype"],
    }
    return json.loads(json.dumps(arguments))


# ----------------------------------------------------------------------------
# Previews and generation


def _write_previews(job: _Job, done: set, preview_count: int) -> list[str]:
    folder = os.path.join(job.folder.run_dir, "previews")
    os.makedirs(folder, exist_ok=True)
    paths = []
    for spec in job.defects:
        slots = [slot for slot in range(job.images_per_defect) if (spec.name, slot) in done][:preview_count]
        if not slots:
            continue
        rows = []
        for slot in slots:
            image_path, mask_path = job.folder.pair_paths(spec.name, slot)
            source = _open_image(job.sources[slot % len(job.sources)].path)
            source = PIL.Image.fromarray(
                (image_to_tensor(source).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            )
            rows.append((source, _open_image(image_path), _open_image(mask_path), f"#{slot}"))
        path = os.path.join(folder, f"{spec.name}.png")
        write_preview(rows, path)
        paths.append(path)
    return paths


def _blocks(job: _Job) -> list[tuple[DefectSpec, list[int]]]:
    """Split every defect's slots into fixed blocks of `batch_size` consecutive slots."""
    return [
        (spec, list(range(start, min(start + job.batch_size, job.images_per_defect))))
        for spec in job.defects
        for start in range(0, job.images_per_defect, job.batch_size)
    ]


def _open_image(path: str) -> PIL.Image.Image:
    with PIL.Image.open(path) as image:
        return image.copy()


def _generate_block(pipe, job: _Job, spec: DefectSpec, slots: list[int], done: set, rejection_keys: set,
                    records: JsonlAppender, rejections: JsonlAppender, bar) -> None:
    """Generate one block, retrying rejected slots with new seeds; write the pairs that are not done yet.

    Attempt 0 runs every slot of the block, also those already done by an
    earlier run, and each retry runs the slots rejected by the attempt before,
    so every pipeline call has the batch it had in an uninterrupted run.
    """
    active = list(slots)
    for attempt in range(job.max_retries + 1):
        if all((spec.name, slot) in done for slot in active):
            return
        sources = [job.sources[slot % len(job.sources)] for slot in active]
        seeds = [slot_seed(job.seed, spec.name, slot, attempt) for slot in active]
        object_masks = None
        if sources[0].object_mask_path is not None:
            object_masks = [load_object_mask(source.object_mask_path, job.image_size) for source in sources]
        call_arguments = {key: value for key, value in job.pipeline_arguments.items() if value is not None}
        try:
            output = pipe(
                image=[_open_image(source.path) for source in sources],
                prompt=spec.prompt,
                anomaly_prompt=spec.anomaly_prompt,
                negative_prompt=job.negative_prompt,
                object_mask=object_masks,
                generator=[torch.Generator("cpu").manual_seed(seed) for seed in seeds],
                output_type="pil",
                **call_arguments,
            )
        except ValueError as error:
            raise DatasetGenerationError(
                f"DeltaDenoPipeline rejected the call for {spec.name!r} slots {active}: {error}"
            ) from error
        batch = [{"slot": slot, "source_image": source.path, "seed": seed}
                 for slot, source, seed in zip(active, sources, seeds)]

        rejected = []
        for index, slot in enumerate(active):
            mask_pixels = int(np.count_nonzero(np.asarray(output.masks[index])))
            mask_area = mask_pixels / (job.image_size[0] * job.image_size[1])
            change = float(output.mask_change[index])
            reason = None
            if output.empty_masks[index]:
                reason = "empty_mask"
            elif change < job.min_change:
                reason = "low_change"
            common = {
                "defect": spec.name, "slot": slot, "attempt": attempt, "seed": seeds[index],
                "source_image": sources[index].path, "mask_change": change, "mask_area_fraction": mask_area,
            }
            if reason is not None:
                rejected.append(slot)
                if (spec.name, slot, attempt) in rejection_keys:
                    continue
                last = attempt == job.max_retries
                rejections.append({**common, "reason": reason, "min_change": job.min_change})
                rejection_keys.add((spec.name, slot, attempt))
                bar.set_postfix(rejected=len(rejection_keys), refresh=False)
                logger.debug("Rejected %s slot %d attempt %d: %s (change %.4f).", spec.name, slot, attempt, reason, change)
                if last and (spec.name, slot) not in done:
                    logger.warning("%s slot %d: all %d attempts were rejected.", spec.name, slot, attempt + 1)
                    bar.update()
                continue
            if (spec.name, slot) in done:
                continue
            image_path, mask_path = job.folder.pair_paths(spec.name, slot)
            write_png_atomic(output.images[index], image_path)
            write_png_atomic(output.masks[index], mask_path)
            records.append({
                **common,
                "image": job.folder.relative(image_path),
                "mask": job.folder.relative(mask_path),
                "source_sha256": sources[index].sha256,
                "object_mask": sources[index].object_mask_path,
                "prompt": spec.prompt,
                "anomaly_prompt": spec.anomaly_prompt,
                "negative_prompt": job.negative_prompt,
                "anomaly_tokens": output.anomaly_tokens[index],
                "mask_pixels": mask_pixels,
                "pipeline_arguments": job.pipeline_arguments,
                # Batched calls differ from single ones in the last bits, so the batch is part of the recipe.
                "batch": batch,
                "batch_index": index,
                **job.record_context,
            })
            done.add((spec.name, slot))
            bar.update()
        active = rejected
        if not active:
            return


# ----------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deltadeno-generate",
        description="Paint defects onto defect-free images with DeltaDeno and write an anomaly dataset "
        "(images and 0/255 masks) with per-pair metadata. Rerun the same command to resume.",
        formatter_class=_HelpFormatter,
    )
    data = parser.add_argument_group("input and output")
    data.add_argument("--input", required=True, help="folder of defect-free images, or an MVTec AD category "
                      "folder (its train/good/ images are used)")
    data.add_argument("--output", required=True, help="dataset root; must not lie inside --input")
    data.add_argument("--object", required=True, help="name of the part in the prompts, e.g. bottle")
    data.add_argument("--defects", required=True, nargs="+", metavar="NAME[=WORDS]",
                      help="defect names (folder names and prompt words); NAME=WORDS puts WORDS in the prompt")
    data.add_argument("--images-per-defect", type=int, default=10, help="pairs to generate per defect")
    data.add_argument("--category", help="category folder name (default: the MVTec AD category folder's "
                      "name, else --object)")
    data.add_argument("--layout", choices=LAYOUTS, default="mvtec", help="mvtec: <category>/test/<defect>/000.png "
                      "and ground_truth/<defect>/000_mask.png; seas: <category>/<defect>/image/0.png and mask/0.png")
    data.add_argument("--object-masks", help="folder of part masks with the images' file names; defects stay "
                      "inside the part")
    data.add_argument("--pattern", default="*", help="shell pattern the input file names must match")
    data.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                      help="input images with more pixels (width x height) are skipped")
    data.add_argument("--overwrite", action="store_true", help="delete the pairs and records of an earlier "
                      "run of this category and start anew")
    data.add_argument("--preview-count", type=int, default=8, help="pairs per defect in the preview grid")

    prompts = parser.add_argument_group("prompts")
    prompts.add_argument("--prompt-template", default=DEFAULT_PROMPT_TEMPLATE, help="normal prompt; {object} is replaced")
    prompts.add_argument("--anomaly-prompt-template", default=DEFAULT_ANOMALY_PROMPT_TEMPLATE,
                         help="anomaly prompt; {object} and {defect} are replaced")
    prompts.add_argument("--negative-prompt", help="prompt of the unconditional branch (default: empty)")

    job = parser.add_argument_group("generation")
    job.add_argument("--model", help="Hugging Face Hub id or local Stable Diffusion folder (default: the bundled "
                     "small model, in a source checkout only)")
    job.add_argument("--seed", type=int, default=0, help="base seed; every slot's seed derives from it")
    job.add_argument("--batch-size", type=int, default=1, help="slots per pipeline call; a resumed run must use "
                     "the same value")
    job.add_argument("--min-change", type=float, default=DEFAULT_MIN_CHANGE, help="reject generations whose mean "
                     "absolute change inside the mask (pixel values in [0, 1]) is lower")
    job.add_argument("--max-retries", type=int, default=DEFAULT_MAX_RETRIES, help="retries with new seeds of a "
                     "rejected slot; raise it on a rerun to retry slots that exhausted it")
    job.add_argument("--height", type=int, help="resize the images to this height first (with --width)")
    job.add_argument("--width", type=int, help="resize the images to this width first (with --height)")
    job.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto",
                     help="model precision; auto is float16 on CUDA, float32 otherwise")
    job.add_argument("--device", default="auto", help="torch device; auto picks CUDA when available")
    job.add_argument("--trust-remote-code", action="store_true", help="allow pipeline code stored with the model")
    job.add_argument("--quiet", action="store_true", help="log warnings and errors only")
    job.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    pipeline = parser.add_argument_group("pipeline arguments (DeltaDenoPipeline.__call__)")
    defaults = pipeline_defaults()
    for name, (kind, help_text) in PIPELINE_ARGUMENTS.items():
        option = "--" + name.replace("_", "-")
        default_text = f"(default: {defaults[name]})" if defaults[name] is not None else "(default: unset)"
        if kind is bool:
            pipeline.add_argument(option, action=argparse.BooleanOptionalAction, default=None,
                                  help=f"{help_text} {default_text}")
        else:
            pipeline.add_argument(option, type=kind, choices=PIPELINE_CHOICES.get(name), default=None,
                                  help=f"{help_text} {default_text}")
    return parser


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show defaults, except unset ones and flags; pipeline options state the pipeline's default themselves."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def _configure_logging(quiet: bool) -> list[tuple[python_logging.Logger, list, int, bool]]:
    """Send this project's log records to stderr; return each logger's previous (handlers, level, propagate)."""
    rank = os.environ.get("RANK")
    prefix = f"deltadeno-generate[rank {rank}]" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "deltadeno-generate"
    handler = python_logging.StreamHandler(sys.stderr)
    handler.setFormatter(python_logging.Formatter(f"{prefix}: %(levelname)s: %(message)s"))
    previous = []
    for name in (__name__, "deltadeno_dataset", "pipeline_deltadeno"):
        item = python_logging.getLogger(name)
        previous.append((item, item.handlers, item.level, item.propagate))
        item.handlers = [handler]
        item.setLevel(python_logging.WARNING if quiet else python_logging.INFO)
        item.propagate = False
    return previous


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return 0 on success, 1 when the job failed, 2 for invalid arguments."""
    args = build_parser().parse_args(argv)
    pipeline_kwargs = {name: getattr(args, name) for name in PIPELINE_ARGUMENTS if getattr(args, name) is not None}
    from tqdm.contrib.logging import logging_redirect_tqdm

    is_main = int(os.environ.get("RANK", "0")) == 0
    previous_logging = _configure_logging(args.quiet)
    try:
        with logging_redirect_tqdm(loggers=[item for item, *_ in previous_logging]):
            summary = generate_dataset(
                args.input, args.output, args.object, args.defects, args.images_per_defect,
                seed=args.seed, category=args.category, layout=args.layout, model=args.model,
                prompt_template=args.prompt_template, anomaly_prompt_template=args.anomaly_prompt_template,
                negative_prompt=args.negative_prompt, object_mask_dir=args.object_masks, pattern=args.pattern,
                height=args.height, width=args.width, batch_size=args.batch_size, min_change=args.min_change,
                max_retries=args.max_retries, max_pixels=args.max_pixels, pipeline_kwargs=pipeline_kwargs,
                dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code,
                overwrite=args.overwrite, preview_count=args.preview_count, progress=not args.no_progress,
            )
    except RetryLimitExceeded as error:
        if is_main:
            print(error.summary.format())
        print(f"deltadeno-generate: error: {error}", file=sys.stderr)
        return 1
    except DatasetGenerationError as error:
        print(f"deltadeno-generate: error: {error}", file=sys.stderr)
        return 2
    finally:
        for item, handlers, level, propagate in previous_logging:
            item.handlers, item.level, item.propagate = handlers, level, propagate
    if is_main:
        print(summary.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
