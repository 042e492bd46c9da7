"""Measure DeltaDeno on the bundled small model and held-out crops; print a table per defect kind.

    python examples/evaluate_small_model.py                  # all 16 held-out crops per texture
    python examples/evaluate_small_model.py --crops 4 --markdown results.md

What each column means is explained in `small_model/evaluation.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO_ROOT, os.path.join(REPO_ROOT, "small_model")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from evaluation import evaluate, format_markdown, mask_agreement  # noqa: E402

from pipeline_deltadeno import DeltaDenoPipeline  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=os.path.join(REPO_ROOT, "small_model", "deltadeno-small"))
    parser.add_argument("--crops", type=int, default=16, help="held-out crops per texture (at most 16)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--strength", type=float, default=0.75)
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    parser.add_argument(
        "--call-kwargs", default="{}", help='extra pipeline arguments as JSON, e.g. \'{"attribution_fraction": 0.3}\''
    )
    parser.add_argument(
        "--compare-kwargs",
        help="also report how far the masks of these pipeline arguments (JSON) agree with the default ones",
    )
    parser.add_argument("--markdown", help="also write the table to this file")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if not 1 <= args.crops <= 16:
        sys.exit(f"--crops must be between 1 and 16; got {args.crops}")
    torch.set_num_threads(os.cpu_count() or 1)
    pipe = DeltaDenoPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    start = time.perf_counter()
    summaries = evaluate(
        pipe, crops_per_texture=args.crops, seed=args.seed, num_inference_steps=args.steps,
        strength=args.strength, guidance_scale=args.guidance_scale, **json.loads(args.call_kwargs),
    )
    table = format_markdown(summaries)
    if args.compare_kwargs:
        agreement = mask_agreement(
            pipe, json.loads(args.call_kwargs), json.loads(args.compare_kwargs), crops_per_texture=args.crops,
            seed=args.seed, num_inference_steps=args.steps, strength=args.strength,
            guidance_scale=args.guidance_scale,
        )
        table += (
            f"\nMasks with {args.compare_kwargs} against {args.call_kwargs}: mean IoU {agreement['mean_iou']:.2f}, "
            f"overlapping in {agreement['overlap_rate']:.0%} of cases.\n"
        )
    print(table)
    print(f"evaluated in {time.perf_counter() - start:.0f} s")
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as handle:
            handle.write(table)


if __name__ == "__main__":
    main()
