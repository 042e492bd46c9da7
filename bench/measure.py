"""Wall-clock timing, peak memory and a description of the machine, with public tools only.

Times come from `time.perf_counter`, with `torch.cuda.synchronize` around each
call on a GPU. Peak memory on a CPU is the peak resident set size
(`resource.getrusage(...).ru_maxrss`) of a forked child that runs one call. On
a GPU it is `torch.cuda.max_memory_allocated` around the call.
"""

from __future__ import annotations

import datetime
import gc
import json
import math
import os
import platform
import resource
import select
import signal
import statistics
import subprocess
import time
from dataclasses import dataclass
from typing import Callable

import torch

from bench.components import REPO_ROOT

MIB = 1024 * 1024


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def time_call(function: Callable[[], object], device: str, calls: int = 1) -> float:
    """Return the mean wall-clock seconds of `calls` consecutive calls of `function`."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        function()
    synchronize(device)
    return (time.perf_counter() - start) / calls


def time_interleaved(
    functions: dict[str, Callable[[], object]],
    repeats: int,
    device: str,
    warmup_rounds: int = 0,
    min_sample_seconds: float = 0.0,
    prepare: dict[str, Callable[[], object]] | None = None,
    on_sample: Callable[[str, float], None] | None = None,
) -> dict[str, list[float]]:
    """Time the functions in rounds (A B C, A B C, ...) and return each one's per-call seconds, one per round.

    Interleaving spreads slow drifts of a shared machine over all functions
    alike. With `min_sample_seconds` a sample averages as many consecutive
    calls as fill that time, so that calls of a few microseconds are measurable.
    `prepare[key]`, if given, runs untimed before every sample of `key`, and
    `on_sample(key, seconds)` after it.
    """
    prepare = prepare or {}

    def run_untimed(key):
        if key in prepare:
            prepare[key]()
        functions[key]()

    for _ in range(warmup_rounds):
        for key in functions:
            run_untimed(key)
    calls = {}
    for key, function in functions.items():
        calls[key] = 1
        if min_sample_seconds > 0:
            if key in prepare:
                prepare[key]()
            single = time_call(function, device)
            calls[key] = max(1, math.ceil(min_sample_seconds / max(single, 1e-9)))
    samples: dict[str, list[float]] = {key: [] for key in functions}
    for _ in range(repeats):
        for key, function in functions.items():
            if key in prepare:
                prepare[key]()
            samples[key].append(time_call(function, device, calls[key]))
            if on_sample is not None:
                on_sample(key, samples[key][-1])
    return samples


def median(values: list[float]) -> float:
    return statistics.median(values)


# ----------------------------------------------------------------------------
# Peak memory


@dataclass
class MemoryResult:
    """Peak and resting memory of one call, in MiB.

    Attributes:
        peak_mib: peak resident set size of the process during the call (CPU), or
            peak allocated GPU memory (CUDA); the models' weights included.
        resting_mib: the same quantity just before the call.
    """

    peak_mib: float
    resting_mib: float

    @property
    def call_mib(self) -> float:
        """Memory the call needed on top of what was resident before it."""
        return self.peak_mib - self.resting_mib


def resident_set_mib() -> float:
    """Return the current resident set size of this process in MiB (Linux `/proc/self/status`)."""
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024 / MIB
    raise RuntimeError("VmRSS is missing from /proc/self/status; peak memory on CPU needs Linux.")


def peak_rss_mib() -> float:
    """Return the peak resident set size of this process in MiB (`ru_maxrss` is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MIB


def peak_memory_forked(function: Callable[[], object], threads: int, timeout_seconds: float) -> MemoryResult:
    """Run `function` once in a forked child and return the child's peak and resting resident set size.

    The child shares the parent's built components; Linux starts a forked
    child's peak at its resident size at fork, so the peak is that of this call
    alone, not of building the components or of earlier calls in the parent.

    The parent must not have run multi-threaded torch work before forking: an
    OpenMP thread pool started in the parent can hang the child. The child is
    killed after `timeout_seconds`.
    """
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        exit_code = 0
        try:
            torch.set_num_threads(threads)
            gc.collect()
            resting = resident_set_mib()
            function()
            payload = {"peak_mib": peak_rss_mib(), "resting_mib": resting}
        except BaseException as error:  # reported to the parent, which raises it
            payload = {"error": f"{type(error).__name__}: {error}"}
            exit_code = 1
        with os.fdopen(write_fd, "w", encoding="utf-8") as handle:
            json.dump(payload, handle)
        os._exit(exit_code)

    os.close(write_fd)
    chunks = []
    deadline = time.monotonic() + timeout_seconds
    with os.fdopen(read_fd, "rb") as handle:
        while True:
            remaining = deadline - time.monotonic()
            ready, _, _ = select.select([handle], [], [], max(0.0, remaining))
            if not ready:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise TimeoutError(
                    f"the memory-measuring child process did not finish within {timeout_seconds:.0f} s and was "
                    "killed; it hangs when the parent ran multi-threaded torch work before forking."
                )
            chunk = os.read(handle.fileno(), 65536)
            if not chunk:
                break
            chunks.append(chunk)
    os.waitpid(pid, 0)
    payload = json.loads(b"".join(chunks) or b"{}")
    if "error" in payload or "peak_mib" not in payload:
        raise RuntimeError(f"the memory-measuring child process failed: {payload.get('error', 'no result')}")
    return MemoryResult(payload["peak_mib"], payload["resting_mib"])


def peak_memory_cuda(function: Callable[[], object], device: str) -> MemoryResult:
    """Run `function` once and return the peak and resting allocated GPU memory."""
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.synchronize(device)
    resting = torch.cuda.memory_allocated(device) / MIB
    torch.cuda.reset_peak_memory_stats(device)
    function()
    torch.cuda.synchronize(device)
    return MemoryResult(torch.cuda.max_memory_allocated(device) / MIB, resting)


# ----------------------------------------------------------------------------
# The machine


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / (1024 * 1024)
    except OSError:
        pass
    return None


def _git_commit() -> str:
    try:
        result = subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return result.stdout.strip() or "unknown"


def describe_machine(device: str) -> dict:
    """Return the CPU model, core count, RAM, GPU, library versions, torch threads and date of this run."""
    import diffusers
    import transformers

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    memory = _memory_gib()
    return {
        "cpu": _cpu_model(),
        "cores": cores,
        "ram": f"{memory:.1f} GiB" if memory is not None else "unknown",
        "gpu": torch.cuda.get_device_name(device) if device.startswith("cuda") else "none used",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
        "commit": _git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
