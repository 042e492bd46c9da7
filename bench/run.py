"""Measure DeltaDeno's cost against img2img and DiffEdit, side by side in one process.

CPU run on Stable Diffusion 1.5-shaped components with random weights:

    python -m bench.run --threads 2 --output results.md

Quick check on the tiny test components:

    python -m bench.run --tiny

On a GPU:

    python -m bench.run --device cuda --dtype float16 --size 512 --steps 50

Run it from the repository root. The report (Markdown) goes to stdout and to
`--output`; `--json` also writes every sample.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time

import torch

from bench.attention import benchmark_attention
from bench.cases import GUIDANCE_SCALE, PipelineCases, Settings
from bench.components import build_components, load_tokenizer
from bench.measure import MemoryResult, describe_machine, median, peak_memory_cuda, peak_memory_forked, time_interleaved
from bench.report import render_report

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="use the tiny test components instead of SD 1.5 shapes")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="weights and activations dtype")
    parser.add_argument("--size", type=int, help="image side in pixels (default 256, or 32 with --tiny)")

    parser.add_argument("--steps", type=int, default=10, help="num_inference_steps of every call (default 10)")
    parser.add_argument("--strength", type=float, default=0.8, help="strength of every call, in (0, 1] (default 0.8)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds of the pipeline calls (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds before the timed ones (default 1)")
    parser.add_argument("--unet-repeats", type=int, default=5, help="interleaved rounds of the UNet calls (default 5)")
    parser.add_argument(
        "--layer-sample-seconds",
        type=float,
        default=0.2,
        help="each per-layer attention sample averages as many calls as fill this many seconds (default 0.2)",
    )

    parser.add_argument("--threads", type=int, help="torch threads for the timed work (default: all usable cores)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    parser.add_argument(
        "--memory-timeout", type=float, default=3600, help="seconds before a memory-measuring child is killed"
    )
    parser.add_argument("--output", help="also write the Markdown report to this file")
    parser.add_argument("--json", help="also write all results, every sample included, to this JSON file")
    args = parser.parse_args(argv)

    if args.size is None:
        args.size = 32 if args.tiny else 256
    if args.threads is None:
        args.threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()

    for name in ("steps", "repeats", "unet_repeats", "threads", "size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1; got {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be 0 or more; got {args.warmup}")
    if not 0.0 < args.strength <= 1.0:
        parser.error(f"--strength must be in (0, 1]; got {args.strength}")
    return args


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_benchmarks(args: argparse.Namespace, command: str) -> dict:
    """Build the components, measure peak memory, time the pipelines and the processors; return the results."""
    started = time.perf_counter()
    # Described before the run, so that the commit is the one whose code the run imported.
    machine = describe_machine(args.device)
    machine["torch_threads"] = args.threads
    on_cuda = args.device.startswith("cuda")
    measure_memory = not args.no_memory
    if not on_cuda and measure_memory:
        # Forked memory children hang if this process has started an OpenMP pool.
        torch.set_num_threads(1)
    else:
        torch.set_num_threads(args.threads)

    architecture = "tiny" if args.tiny else "sd15"
    settings = Settings(args.size, args.steps, args.strength, args.device, DTYPES[args.dtype])
    with tempfile.TemporaryDirectory(prefix="deltadeno-bench-") as tokenizer_dir:
        tokenizer = load_tokenizer(tokenizer_dir)
    _log(f"building {architecture} components on {args.device} ({args.dtype})")
    components = build_components(architecture, tokenizer, args.device, settings.dtype)
    pipelines = PipelineCases(components, settings)
    cases = pipelines.cases()

    memory: dict[str, MemoryResult | None] = {case.key: None for case in cases}
    if measure_memory and not on_cuda:
        # Before any timed work: every child starts from the same freshly built state.
        for case in cases:
            _log(f"peak memory: {case.key}")
            memory[case.key] = peak_memory_forked(case.run, args.threads, args.memory_timeout)
    torch.set_num_threads(args.threads)

    _log(f"timing {len(cases)} pipeline calls, {args.warmup} warm-up and {args.repeats} timed rounds")
    samples = time_interleaved(
        {case.key: case.run for case in cases},
        args.repeats,
        args.device,
        args.warmup,
        on_sample=lambda key, seconds: _log(f"  {key}: {seconds:.3f} s"),
    )

    # NOTE: the CUDA path (synchronized timing, peak_memory_cuda) has not been run on a GPU yet.
    if measure_memory and on_cuda:
        # After the timed rounds, so that one-time allocations (cuBLAS workspaces,
        # kernel caches) are resting memory for every case, not the first case's peak.
        for case in cases:
            _log(f"peak memory: {case.key}")
            memory[case.key] = peak_memory_cuda(case.run, args.device)

    _log("timing the attention processors")
    attention = benchmark_attention(
        pipelines.deltadeno, settings, args.unet_repeats, min_sample_seconds=args.layer_sample_seconds
    )

    denoising_steps = min(int(args.steps * args.strength), args.steps)
    return {
        "title": f"{'Tiny test' if args.tiny else 'Stable Diffusion 1.5'} components, {args.device}",
        "command": command,
        "machine": machine,
        "settings": {
            "components": "tiny test components" if args.tiny else "Stable Diffusion 1.5 architecture",
            "device": args.device,
            "dtype": args.dtype,
            "size": args.size,
            "steps": args.steps,
            "strength": args.strength,
            "denoising_steps": denoising_steps,
            "guidance_scale": GUIDANCE_SCALE,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "unet_repeats": args.unet_repeats,
        },
        "pipelines": [
            {
                "key": case.key,
                "label": case.label,
                "samples": samples[case.key],
                "median_s": median(samples[case.key]),
                "memory": None
                if memory[case.key] is None
                else {
                    "peak_mib": memory[case.key].peak_mib,
                    "resting_mib": memory[case.key].resting_mib,
                    "call_mib": memory[case.key].call_mib,
                },
            }
            for case in cases
        ],
        "layers": attention["layers"],
        "unet": attention["unet"],
        "elapsed_s": time.perf_counter() - started,
    }


def main(argv: list[str] | None = None) -> dict:
    """Run the harness with command-line arguments `argv`; print and write the report; return the results."""
    arguments = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(arguments)
    command = shlex.join(["python", "-m", "bench.run", *arguments])
    results = run_benchmarks(args, command)
    report = render_report(results)
    print(report)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as handle:
            handle.write(report)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=2)
    return results


if __name__ == "__main__":
    main()
