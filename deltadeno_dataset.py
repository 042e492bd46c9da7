"""Files of a generated anomaly dataset: input scanning, output layouts, crash-safe writes, previews.

Helpers of `deltadeno_generate`. Every file is written under a temporary name
in its destination folder and renamed into place with `os.replace`, so a
reader (or a resumed job) finds either the old file, the complete new one, or
nothing. JSON Lines files are only appended to; a line torn by a killed
process is cut off by `read_jsonl` with `repair=True`.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass

import numpy as np
import PIL.Image
import PIL.ImageDraw

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

# Largest accepted input image in pixels (width * height), checked from the file header before
# decoding. 4096 x 4096 covers MVTec AD (up to 1024 x 1024) and VisA (about 1500 x 1000) with
# room to spare and bounds the memory of one decoded image to about 50 MB (RGB, 8 bit).
DEFAULT_MAX_PIXELS = 4096 * 4096

LAYOUTS = ("mvtec", "seas")

# Names of temporary files: ".<final name>.tmp<pid>", hidden from glob("*") and never a final name.
_TEMPORARY_NAME = re.compile(r"^\..+\.tmp\d+$")


class DatasetGenerationError(ValueError):
    """An invalid argument, input or output folder state, with a message saying what to change."""


# ----------------------------------------------------------------------------
# Names and paths


def check_plain_name(value: str, argument: str) -> str:
    """Return `value` if it can be one folder name, else raise naming the argument and the value."""
    if not isinstance(value, str) or not value or value.strip() != value:
        raise DatasetGenerationError(
            f"{argument} must be a non-empty name without leading or trailing spaces; got {value!r}."
        )
    separators = {"/", "\\", os.sep} | ({os.altsep} if os.altsep else set())
    if value in (".", "..") or any(sep in value for sep in separators) or any(ord(c) < 32 for c in value):
        raise DatasetGenerationError(
            f"{argument} must be a plain folder name (no path separators, control characters, '.' or '..'); "
            f"got {value!r}."
        )
    return value


def is_inside(path: str, folder: str) -> bool:
    """Return True when `path` is `folder` or lies below it, after resolving symbolic links."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder


def slot_file_name(slot: int, images_per_defect: int, layout: str) -> str:
    """Return the image file name of a slot: "007.png" (MVTec AD, at least 3 digits) or "7.png"."""
    if layout == "mvtec":
        digits = max(3, len(str(images_per_defect - 1)))
        return f"{slot:0{digits}d}.png"
    return f"{slot}.png"


def pair_paths(root: str, category: str, defect: str, slot: int, images_per_defect: int, layout: str) -> tuple[str, str]:
    """Return the (image, mask) paths of a slot below the dataset root.

    MVTec AD: `<category>/test/<defect>/000.png` and `<category>/ground_truth/<defect>/000_mask.png`.
    AnomalyDiffusion / SeaS evaluation: `<category>/<defect>/image/0.png` and `<category>/<defect>/mask/0.png`.
    """
    name = slot_file_name(slot, images_per_defect, layout)
    image_folder, mask_folder = pair_folders(root, category, defect, layout)
    if layout == "mvtec":
        return os.path.join(image_folder, name), os.path.join(mask_folder, name[:-4] + "_mask.png")
    return os.path.join(image_folder, name), os.path.join(mask_folder, name)


def pair_folders(root: str, category: str, defect: str, layout: str) -> tuple[str, str]:
    """Return the (image folder, mask folder) of one defect in the given layout."""
    if layout == "mvtec":
        return (
            os.path.join(root, category, "test", defect),
            os.path.join(root, category, "ground_truth", defect),
        )
    return os.path.join(root, category, defect, "image"), os.path.join(root, category, defect, "mask")


def is_temporary_name(name: str) -> bool:
    return bool(_TEMPORARY_NAME.match(name))


def remove_temporary_files(folder: str) -> list[str]:
    """Delete the temporary files that a killed writer left in `folder`; return their names."""
    if not os.path.isdir(folder):
        return []
    removed = []
    for name in sorted(os.listdir(folder)):
        if is_temporary_name(name):
            os.remove(os.path.join(folder, name))
            removed.append(name)
    return removed


# ----------------------------------------------------------------------------
# Crash-safe writes


def _temporary_path(path: str) -> str:
    folder, name = os.path.split(path)
    return os.path.join(folder, f".{name}.tmp{os.getpid()}")


def _replace_synced(temporary_path: str, path: str) -> None:
    with open(temporary_path, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(temporary_path, path)


def write_png_atomic(image: PIL.Image.Image, path: str) -> None:
    """Write `image` as PNG to `path` through a temporary file in the same folder."""
    temporary_path = _temporary_path(path)
    try:
        # No text chunks or timestamps, so equal pixels give equal bytes.
        image.save(temporary_path, format="PNG")
        _replace_synced(temporary_path, path)
    except BaseException:
        if os.path.exists(temporary_path):
            os.remove(temporary_path)
        raise


def write_text_atomic(text: str, path: str) -> None:
    """Write UTF-8 `text` to `path` through a temporary file in the same folder."""
    temporary_path = _temporary_path(path)
    try:
        with open(temporary_path, "w", encoding="utf-8") as handle:
            handle.write(text)
        _replace_synced(temporary_path, path)
    except BaseException:
        if os.path.exists(temporary_path):
            os.remove(temporary_path)
        raise


def to_json_line(record: dict) -> str:
    return json.dumps(record, sort_keys=True, ensure_ascii=False) + "\n"


class JsonlAppender:
    """Append-only JSON Lines file; every record is flushed and fsynced before `append` returns."""

    def __init__(self, path: str):
        self.path = path
        self._handle = open(path, "a", encoding="utf-8")

    def append(self, record: dict) -> None:
        self._handle.write(to_json_line(record))
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        self._handle.close()


def read_jsonl(path: str, repair: bool = False) -> list[dict]:
    """Read a JSON Lines file; a missing file has no records.

    Bytes after the last newline are what a killed append leaves behind: they
    are ignored, and with `repair=True` the file is truncated to its last
    complete line. An invalid complete line raises, because appends cannot
    produce one.
    """
    if not os.path.exists(path):
        return []
    with open(path, "rb") as handle:
        data = handle.read()
    end = data.rfind(b"\n") + 1
    records = []
    for number, line in enumerate(data[:end].splitlines(), start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise DatasetGenerationError(
                f"{path} line {number} is not valid JSON ({error}); the file was changed by something other "
                "than deltadeno-generate. Restore it, or start anew with --overwrite."
            ) from error
    if repair and end < len(data):
        with open(path, "r+b") as handle:
            handle.truncate(end)
            handle.flush()
            os.fsync(handle.fileno())
    return records


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------
# Input images


@dataclass(frozen=True)
class SourceImage:
    """One readable defect-free input image, with its optional object mask."""

    path: str
    size: tuple[int, int]  # (width, height)
    sha256: str
    object_mask_path: str | None = None
    object_mask_sha256: str | None = None


def find_source_folder(input_dir: str) -> tuple[str, bool]:
    """Return the folder holding the good images and whether `input_dir` is an MVTec AD category.

    An MVTec AD category keeps its defect-free training images in `<category>/train/good/`.
    """
    if not os.path.isdir(input_dir):
        kind = "is not a folder" if os.path.exists(input_dir) else "was not found"
        raise DatasetGenerationError(f"input folder {input_dir!r} {kind}; pass a folder of defect-free images.")
    mvtec_folder = os.path.join(input_dir, "train", "good")
    if os.path.isdir(mvtec_folder):
        return mvtec_folder, True
    return input_dir, False


def list_image_files(folder: str, pattern: str) -> list[str]:
    """Return the image files in `folder` (not recursive) whose names match `pattern`, sorted by name."""
    names = [
        name
        for name in os.listdir(folder)
        if name.lower().endswith(IMAGE_EXTENSIONS)
        and fnmatch.fnmatch(name, pattern)
        and not name.startswith(".")
        and os.path.isfile(os.path.join(folder, name))
    ]
    return [os.path.join(folder, name) for name in sorted(names)]


def check_image_file(path: str, max_pixels: int) -> tuple[int, int]:
    """Decode an image fully and return its (width, height); raise ValueError saying why it is unusable."""
    try:
        with PIL.Image.open(path) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise ValueError(
                    f"{width}x{height} = {width * height} pixels exceeds the limit of {max_pixels} pixels "
                    "(raise --max-pixels to accept it)"
                )
            # Decoding the whole file finds truncated and corrupt data, which opening alone does not.
            image.load()
    except (OSError, SyntaxError, PIL.Image.DecompressionBombError) as error:
        raise ValueError(f"unreadable image ({type(error).__name__}: {error})") from error
    if width < 1 or height < 1:
        raise ValueError(f"image has no pixels ({width}x{height})")
    return width, height


def find_object_mask(mask_dir: str, image_path: str) -> str | None:
    """Return the mask with the image's file name in `mask_dir`, or one with the same stem and an image
    extension, or None."""
    name = os.path.basename(image_path)
    exact = os.path.join(mask_dir, name)
    if os.path.isfile(exact):
        return exact
    stem = os.path.splitext(name)[0]
    for extension in IMAGE_EXTENSIONS:
        candidate = os.path.join(mask_dir, stem + extension)
        if os.path.isfile(candidate):
            return candidate
    return None


def load_object_mask(path: str, size: tuple[int, int]) -> PIL.Image.Image:
    """Load an object mask as a 0/255 "L" image of `size` (width, height); pixels above half are the part."""
    with PIL.Image.open(path) as mask:
        mask = mask.convert("L")
    mask = mask.point(lambda value: 255 if value > 127 else 0)
    if mask.size != size:
        mask = mask.resize(size, PIL.Image.NEAREST)
    return mask


def scan_source_images(
    folder: str, pattern: str, max_pixels: int, object_mask_dir: str | None
) -> tuple[list[SourceImage], list[tuple[str, str]]]:
    """Check every candidate image (and its object mask) and return the usable ones and the skipped ones.

    Skipped entries are `(path, reason)`. An image is skipped when it cannot be
    decoded, exceeds `max_pixels`, or, with `object_mask_dir`, has no mask there,
    a mask of another size or an all-zero mask.
    """
    sources, skipped = [], []
    for path in list_image_files(folder, pattern):
        try:
            size = check_image_file(path, max_pixels)
        except ValueError as error:
            skipped.append((path, str(error)))
            continue
        mask_path = mask_sha256 = None
        if object_mask_dir is not None:
            mask_path = find_object_mask(object_mask_dir, path)
            if mask_path is None:
                skipped.append((path, f"no object mask with this file name in {object_mask_dir}"))
                continue
            try:
                mask_size = check_image_file(mask_path, max_pixels)
            except ValueError as error:
                skipped.append((path, f"object mask {mask_path}: {error}"))
                continue
            if mask_size != size:
                skipped.append(
                    (path, f"object mask {mask_path} is {mask_size[0]}x{mask_size[1]}, the image {size[0]}x{size[1]}")
                )
                continue
            if not np.asarray(load_object_mask(mask_path, size)).any():
                skipped.append((path, f"object mask {mask_path} is all zero (no pixel above half of the range)"))
                continue
            mask_sha256 = file_sha256(mask_path)
        sources.append(SourceImage(path, size, file_sha256(path), mask_path, mask_sha256))
    return sources, skipped


# ----------------------------------------------------------------------------
# Preview grid


def _overlay(image: PIL.Image.Image, mask: PIL.Image.Image) -> PIL.Image.Image:
    """Tint the masked pixels red and draw the mask outline in yellow."""
    pixels = np.asarray(image.convert("RGB")).astype(np.float32)
    inside = np.asarray(mask.convert("L")) > 127
    tinted = pixels.copy()
    tinted[inside] = 0.5 * pixels[inside] + 0.5 * np.array([255.0, 0.0, 0.0])
    padded = np.pad(inside, 1, mode="edge")
    neighbours_inside = (
        padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    )
    tinted[inside & ~neighbours_inside] = (255.0, 255.0, 0.0)
    return PIL.Image.fromarray(np.round(tinted).astype(np.uint8))


def write_preview(rows: list[tuple[PIL.Image.Image, PIL.Image.Image, PIL.Image.Image, str]], path: str) -> None:
    """Write a grid with one row per pair: input, output, output with the mask overlaid.

    Each row is `(input, output, mask, label)`. All images of a row are shown at the
    output's size, scaled up by an integer factor to at least 128 pixels on the short side.
    """
    width, height = rows[0][1].size
    scale = max(1, -(-128 // min(width, height)))
    tile_width, tile_height = width * scale, height * scale
    header, label_width, gap = 16, 48, 2
    grid = PIL.Image.new(
        "RGB",
        (label_width + 3 * (tile_width + gap), header + len(rows) * (tile_height + gap)),
        (32, 32, 32),
    )
    draw = PIL.ImageDraw.Draw(grid)
    for column, title in enumerate(("input", "output", "mask overlay")):
        draw.text((label_width + column * (tile_width + gap) + 2, 2), title, fill=(230, 230, 230))
    for row, (source, output, mask, label) in enumerate(rows):
        top = header + row * (tile_height + gap)
        draw.text((2, top + 2), label, fill=(230, 230, 230))
        size = (tile_width, tile_height)
        source = source.convert("RGB").resize((width, height), PIL.Image.BICUBIC).resize(size, PIL.Image.NEAREST)
        output = output.convert("RGB").resize(size, PIL.Image.NEAREST)
        # The overlay is drawn at tile size, so the outline stays one pixel wide.
        tiles = (source, output, _overlay(output, mask.resize(size, PIL.Image.NEAREST)))
        for column, tile in enumerate(tiles):
            grid.paste(tile, (label_width + column * (tile_width + gap), top))
    write_png_atomic(grid, path)


# ----------------------------------------------------------------------------
# One category's folder: pair files and the job's records

RUNS_FOLDER = "deltadeno_runs"
RUN_FILE_FORMAT = 1


@dataclass(frozen=True)
class DatasetFolder:
    """One category of a generated dataset below `root`: its pair files and the job's records.

    The records live in `<root>/deltadeno_runs/<category>/`: `run.json` with the run's
    arguments, `shards/` with append-only JSON Lines files (one per process and kind),
    the merged `metadata.jsonl` and `rejections.jsonl`, and `previews/`.
    """

    root: str
    category: str
    layout: str
    defects: tuple[str, ...]
    images_per_defect: int

    @property
    def run_dir(self) -> str:
        return os.path.join(self.root, RUNS_FOLDER, self.category)

    def pair_paths(self, defect: str, slot: int) -> tuple[str, str]:
        return pair_paths(self.root, self.category, defect, slot, self.images_per_defect, self.layout)

    def pair_folders(self, defect: str) -> tuple[str, str]:
        return pair_folders(self.root, self.category, defect, self.layout)

    def relative(self, path: str) -> str:
        """Return `path` relative to the dataset root, with "/" separators."""
        return os.path.relpath(path, self.root).replace(os.sep, "/")

    def shard_paths(self, kind: str) -> list[str]:
        """Return the shard files of `kind` ("metadata" or "rejections") of every process so far."""
        folder = os.path.join(self.run_dir, "shards")
        if not os.path.isdir(folder):
            return []
        return [
            os.path.join(folder, name)
            for name in sorted(os.listdir(folder))
            if name.startswith(kind + "-") and name.endswith(".jsonl")
        ]

    def lock(self):
        """Take an exclusive lock on the category and return the open lock file; closing it releases the lock.

        The lock stops a second job on the same category, and the kernel releases it when the
        holding process dies, also by SIGKILL.
        """
        os.makedirs(os.path.join(self.root, RUNS_FOLDER), exist_ok=True)
        handle = open(os.path.join(self.root, RUNS_FOLDER, self.category + ".lock"), "a")
        try:
            import fcntl
        except ImportError:
            # NOTE: no lock where fcntl is missing (Windows); two jobs on one category there would collide.
            return handle
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as error:
            handle.close()
            raise DatasetGenerationError(
                f"another deltadeno-generate job is writing category {self.category!r} in {self.root}; "
                "wait for it to finish or stop it."
            ) from error
        return handle

    def prepare(self, run_arguments: dict, versions: dict, overwrite: bool) -> None:
        """Check the folder against a stored run, store a new one, and repair what a killed run left.

        `run_arguments` must be JSON-equal across runs that may resume each other, and hold
        "layout", "images_per_defect" and "defects" (entries start with the defect name), which
        tell an `overwrite` which files the stored run wrote.
        """
        stored = self._read_run_file()
        if stored is not None and (overwrite or stored["arguments"] != run_arguments):
            stored_folder = self._stored_folder(stored["arguments"])
            if overwrite or not stored_folder._has_output():
                logger.info("Deleting the earlier run of %r in %s.", self.category, self.root)
                stored_folder._remove()
                stored = None
            else:
                raise DatasetGenerationError(
                    f"{self.run_dir} contains a run of category {self.category!r} with other arguments:\n"
                    f"{_describe_difference(stored['arguments'], run_arguments)}\n"
                    "Rerun with the stored arguments to resume it, pass --overwrite to delete its pairs and "
                    "start anew, or choose another output folder."
                )

        if stored is None:
            # Never mix our pairs into folders that another tool or a real dataset filled.
            for defect in self.defects:
                for folder in self.pair_folders(defect):
                    if os.path.isdir(folder) and os.listdir(folder):
                        raise DatasetGenerationError(
                            f"folder {folder} already contains files and no deltadeno-generate run of category "
                            f"{self.category!r} is recorded in {self.run_dir}; choose another output folder, "
                            "category or defect name."
                        )
            os.makedirs(self.run_dir, exist_ok=True)
            run_file = {"format": RUN_FILE_FORMAT, "arguments": run_arguments, "versions": versions}
            write_text_atomic(json.dumps(run_file, indent=2, sort_keys=True) + "\n", os.path.join(self.run_dir, "run.json"))
        elif stored.get("versions") != versions:
            logger.warning(
                "Software versions differ from those that started %s (%s now, %s then); pairs written from now "
                "on may differ in their last bits from those of an uninterrupted run.",
                self.run_dir, versions, stored.get("versions"),
            )

        # A killed run leaves at most temporary files and a torn last line per shard.
        for defect in self.defects:
            for folder in self.pair_folders(defect):
                os.makedirs(folder, exist_ok=True)
                removed = remove_temporary_files(folder)
                if removed:
                    logger.info("Removed %d temporary file(s) of an interrupted run from %s.", len(removed), folder)
        for folder in (self.run_dir, os.path.join(self.run_dir, "previews")):
            remove_temporary_files(folder)
        for path in self.shard_paths("metadata") + self.shard_paths("rejections"):
            read_jsonl(path, repair=True)

    def read_progress(self) -> tuple[set, set]:
        """Return the complete (defect, slot) pairs and the recorded (defect, slot, attempt) rejections.

        A pair is complete when its record exists and both of its files do. A record is
        appended only after both files were renamed into place.
        """
        done = set()
        for path in self.shard_paths("metadata"):
            for record in read_jsonl(path):
                key = (record["defect"], record["slot"])
                if all(os.path.isfile(path) for path in self.pair_paths(*key)):
                    done.add(key)
        rejection_keys = {
            (record["defect"], record["slot"], record["attempt"])
            for path in self.shard_paths("rejections")
            for record in read_jsonl(path)
        }
        return done, rejection_keys

    def merge_records(self) -> tuple[str, str]:
        """Write `metadata.jsonl` and `rejections.jsonl` from the shards, sorted, one record per key."""
        order = {defect: index for index, defect in enumerate(self.defects)}
        paths = []
        for kind, key_fields in (("metadata", ("defect", "slot")), ("rejections", ("defect", "slot", "attempt"))):
            merged = {}
            for path in self.shard_paths(kind):
                for record in read_jsonl(path):
                    merged[tuple(record[name] for name in key_fields)] = record
            keys = sorted(merged, key=lambda key: (order.get(key[0], len(order)), *key[1:]))
            paths.append(os.path.join(self.run_dir, f"{kind}.jsonl"))
            write_text_atomic("".join(to_json_line(merged[key]) for key in keys), paths[-1])
        return paths[0], paths[1]

    def _read_run_file(self) -> dict | None:
        path = os.path.join(self.run_dir, "run.json")
        if not os.path.exists(path):
            return None
        try:
            with open(path, encoding="utf-8") as handle:
                stored = json.load(handle)
            self._stored_folder(stored["arguments"])
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise DatasetGenerationError(
                f"{path} is unreadable ({error}); remove the folder {self.run_dir} and the category's generated "
                "images, or choose another output folder."
            ) from error
        return stored

    def _stored_folder(self, stored_arguments: dict) -> DatasetFolder:
        """Return this folder as laid out by the run with `stored_arguments`."""
        names = tuple(entry[0] for entry in stored_arguments["defects"])
        for name in names:
            check_plain_name(name, f"defect name stored in {self.run_dir}")
        if stored_arguments["layout"] not in LAYOUTS:
            raise ValueError(f"unknown layout {stored_arguments['layout']!r}")
        return DatasetFolder(self.root, self.category, stored_arguments["layout"], names,
                             int(stored_arguments["images_per_defect"]))

    def _pair_files(self) -> list[tuple[str, list[str]]]:
        """Return (folder, file names) of every pair file that this layout can hold."""
        folders = []
        for defect in self.defects:
            paths = [self.pair_paths(defect, slot) for slot in range(self.images_per_defect)]
            image_folder, mask_folder = self.pair_folders(defect)
            folders.append((image_folder, [os.path.basename(image) for image, _ in paths]))
            folders.append((mask_folder, [os.path.basename(mask) for _, mask in paths]))
        return folders

    def _has_output(self) -> bool:
        shards = self.shard_paths("metadata") + self.shard_paths("rejections")
        return any(os.path.getsize(path) for path in shards) or any(
            os.path.isfile(os.path.join(folder, name)) for folder, names in self._pair_files() for name in names
        )

    def _remove(self) -> None:
        """Delete the pair files this layout names and the run's records; other files stay untouched."""
        category_folder = os.path.join(self.root, self.category)
        for folder, names in self._pair_files():
            if not os.path.isdir(folder):
                continue
            remove_temporary_files(folder)
            for name in names:
                if os.path.isfile(os.path.join(folder, name)):
                    os.remove(os.path.join(folder, name))
            # Remove the folders left empty, up to the category folder.
            while folder != category_folder and not os.listdir(folder):
                os.rmdir(folder)
                folder = os.path.dirname(folder)
        shutil.rmtree(self.run_dir)


def _describe_difference(stored: dict, current: dict) -> str:
    lines = []
    for key in sorted(set(stored) | set(current)):
        if stored.get(key) == current.get(key):
            continue
        if key == "sources":
            lines.append(
                f"  input images: {len(stored.get(key) or [])} stored, {len(current[key])} now, or their contents differ"
            )
        elif key == "pipeline_arguments":
            for name in sorted(set(stored.get(key, {})) | set(current[key])):
                old, new = stored.get(key, {}).get(name), current[key].get(name)
                if old != new:
                    lines.append(f"  pipeline argument {name}: {old!r} stored, {new!r} now")
        else:
            lines.append(f"  {key}: {stored.get(key)!r} stored, {current.get(key)!r} now")
    return "\n".join(lines)
