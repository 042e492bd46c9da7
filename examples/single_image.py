"""Paint one defect onto one image with DeltaDeno and save the image, mask and localization map.

    python examples/single_image.py --image good.png \
        --prompt "a photo of a bottle" --anomaly-prompt "a photo of a bottle with a crack" \
        --model stable-diffusion-v1-5/stable-diffusion-v1-5 --out crack

writes crack.png, crack_mask.png and crack_map.png. The model is a Hub id or a
local diffusers Stable Diffusion folder; the default is the bundled small model.
The image is resized to --size (a multiple of 8 for Stable Diffusion) first.
"""

from __future__ import annotations

import argparse
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402
import torch  # noqa: E402

from pipeline_deltadeno import DeltaDenoPipeline  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--image", required=True, help="defect-free input image")
    parser.add_argument("--prompt", required=True, help='normal prompt, e.g. "a photo of a bottle"')
    parser.add_argument("--anomaly-prompt", required=True, help='e.g. "a photo of a bottle with a crack"')
    parser.add_argument("--model", default=os.path.join(REPO_ROOT, "small_model", "deltadeno-small"))
    parser.add_argument("--out", default="deltadeno", help="output path prefix")
    parser.add_argument("--size", type=int, default=None, help="resize to size x size first (default: keep)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--strength", type=float, default=0.75)
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                        help="default: float16 on CUDA, float32 on CPU")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.dtype:
        dtype = getattr(torch, args.dtype)
    else:
        dtype = torch.float16 if args.device == "cuda" else torch.float32
    pipe = DeltaDenoPipeline.from_pretrained(args.model, dtype=dtype).to(args.device)
    image = PIL.Image.open(args.image)
    result = pipe(
        image=image,
        prompt=args.prompt,
        anomaly_prompt=args.anomaly_prompt,
        height=args.size,
        width=args.size,
        num_inference_steps=args.steps,
        strength=args.strength,
        guidance_scale=args.guidance_scale,
        generator=torch.Generator(args.device).manual_seed(args.seed),
    )
    result.images[0].save(f"{args.out}.png")
    result.masks[0].save(f"{args.out}_mask.png")
    heat = (np.clip(result.localization_maps[0], 0, 1) * 255).astype(np.uint8)
    PIL.Image.fromarray(heat, mode="L").save(f"{args.out}_map.png")
    if result.empty_masks[0]:
        print("no defect region was found; the output equals the input. Try another --seed.")
    else:
        print(f"anomaly tokens {result.anomaly_tokens[0]}, change inside the mask {result.mask_change[0]:.3f}")
    print(f"wrote {args.out}.png, {args.out}_mask.png, {args.out}_map.png")


if __name__ == "__main__":
    main()
