#!/usr/bin/env bash
# Generate a small anomaly dataset from the example brick photos with the bundled small model.
#
# The result is outputs/brick_dataset/brick/test/<defect>/000.png with masks in
# outputs/brick_dataset/brick/ground_truth/<defect>/000_mask.png, and per-pair metadata,
# rejections and preview grids in outputs/brick_dataset/deltadeno_runs/brick/.
# Rerunning the same command after an interruption resumes the job.
set -euo pipefail
cd "$(dirname "$0")/.."

# The small model was trained on captions like "a photo of brick with a scratch" (no article).
python -m deltadeno_generate \
    --input examples/images --pattern "brick_*.png" \
    --output outputs/brick_dataset --object brick \
    --prompt-template "a photo of {object}" \
    --anomaly-prompt-template "a photo of {object} with a {defect}" \
    --defects hole scratch stain --images-per-defect 6 \
    --num-inference-steps 50 --strength 0.75 --batch-size 3

# The same job on Stable Diffusion and an MVTec AD category, one process per GPU, after
# `pip install deltadeno[multi]`. All processes must see the same output folder.
#
#   torchrun --nproc-per-node 4 -m deltadeno_generate \
#       --input mvtec_ad/bottle --output synthetic --object bottle \
#       --defects crack "broken_large=large break" contamination \
#       --model stable-diffusion-v1-5/stable-diffusion-v1-5 --height 512 --width 512 \
#       --images-per-defect 500 --batch-size 8
#
# `accelerate launch --num_processes 4 -m deltadeno_generate ...` starts the same job.
