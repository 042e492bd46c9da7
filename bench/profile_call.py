"""Break pipeline calls down into where the time goes: UNet calls by batch size, VAE, text encoder, the rest.

    python -m bench.profile_call --threads 2
    python -m bench.profile_call --tiny --cases deltadeno --ops 15

Forward hooks on the UNet, the VAE encoder and decoder and the text encoder
time every call of those modules. "Other" is the rest of the call's time
(Python, mask extraction, scheduler steps, composition). `--ops N` adds the N torch
operators with the largest self CPU time per case, from `torch.profiler`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager

import torch

from bench.cases import PipelineCases, Settings
from bench.components import build_components, load_tokenizer
from bench.measure import synchronize
from bench.run import DTYPES


@contextmanager
def module_timers(modules: dict[str, torch.nn.Module], device: str):
    """Time every forward call of each module; yield {name: [(batch, seconds), ...]}."""
    records: dict[str, list[tuple[int, float]]] = defaultdict(list)
    starts: dict[str, float] = {}
    handles = []

    def batch_of(args, kwargs) -> int:
        first = args[0] if args else next(iter(kwargs.values()))
        return int(first.shape[0]) if torch.is_tensor(first) else 0

    for name, module in modules.items():

        def before(module, args, kwargs, name=name):
            synchronize(device)
            starts[name] = time.perf_counter()
            records[name + ":batch"].append((batch_of(args, kwargs), 0.0))

        def after(module, args, kwargs, output, name=name):
            synchronize(device)
            batch = records[name + ":batch"].pop()[0]
            records[name].append((batch, time.perf_counter() - starts[name]))

        handles.append(module.register_forward_pre_hook(before, with_kwargs=True))
        handles.append(module.register_forward_hook(after, with_kwargs=True))
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


def breakdown(pipelines: PipelineCases, key: str, device: str) -> dict:
    """Run case `key` once under module timers; return total seconds and seconds per component."""
    case = next(case for case in pipelines.cases() if case.key == key)
    components = pipelines.deltadeno.components
    modules = {
        "unet": components["unet"],
        "vae encoder": components["vae"].encoder,
        "vae decoder": components["vae"].decoder,
        "text encoder": components["text_encoder"],
    }
    with module_timers(modules, device) as records:
        synchronize(device)
        start = time.perf_counter()
        case.run()
        synchronize(device)
        total = time.perf_counter() - start
    parts = {name: sum(seconds for _, seconds in records[name]) for name in modules}
    unet_by_batch: dict[int, list[float]] = defaultdict(list)
    for batch, seconds in records["unet"]:
        unet_by_batch[batch].append(seconds)
    return {
        "total": total,
        "parts": parts,
        "other": total - sum(parts.values()),
        "unet_by_batch": {batch: (len(times), sum(times)) for batch, times in sorted(unet_by_batch.items())},
        "text_encoder_calls": len(records["text encoder"]),
    }


def top_operators(pipelines: PipelineCases, key: str, count: int) -> str:
    """Return torch.profiler's table of the `count` operators with the largest self CPU time in one call."""
    case = next(case for case in pipelines.cases() if case.key == key)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        case.run()
    return profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=count)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_call", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="use the tiny test components instead of SD 1.5 shapes")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--size", type=int, help="image side in pixels (default 256, or 32 with --tiny)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--strength", type=float, default=0.8)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--cases",
        default="img2img,deltadeno,deltadeno_normal_as_negative",
        help="comma-separated case keys of bench.cases (default: img2img,deltadeno,deltadeno_normal_as_negative)",
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls of each case before its breakdown")
    parser.add_argument("--ops", type=int, default=0, help="also list this many top operators per case")
    args = parser.parse_args(argv)
    size = args.size or (32 if args.tiny else 256)
    torch.set_num_threads(args.threads)

    settings = Settings(size, args.steps, args.strength, args.device, DTYPES[args.dtype])
    with tempfile.TemporaryDirectory(prefix="deltadeno-bench-") as tokenizer_dir:
        tokenizer = load_tokenizer(tokenizer_dir)
    components = build_components("tiny" if args.tiny else "sd15", tokenizer, args.device, settings.dtype)
    pipelines = PipelineCases(components, settings)
    keys = args.cases.split(",")
    known = {case.key for case in pipelines.cases()}
    unknown = [key for key in keys if key not in known]
    if unknown:
        parser.error(f"unknown --cases {unknown}; choose from {sorted(known)}")

    print(f"{size}x{size}, {args.steps} steps at strength {args.strength}, {args.threads} threads", file=sys.stderr)
    for key in keys:
        for _ in range(args.warmup):
            next(case for case in pipelines.cases() if case.key == key).run()
        result = breakdown(pipelines, key, args.device)
        unet = ", ".join(
            f"batch {batch}: {calls} calls {seconds:.2f} s" for batch, (calls, seconds) in result["unet_by_batch"].items()
        )
        parts = ", ".join(f"{name} {seconds:.2f} s" for name, seconds in result["parts"].items())
        print(
            f"{key}: total {result['total']:.2f} s; {parts}; other {result['other']:.2f} s; "
            f"UNet {unet}; text encoder calls {result['text_encoder_calls']}"
        )
        if args.ops:
            print(top_operators(pipelines, key, args.ops))


if __name__ == "__main__":
    main()
