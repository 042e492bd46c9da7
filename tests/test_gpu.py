"""Half precision on CUDA; skipped on machines without a GPU (CI has none)."""

import pytest
import torch
from conftest import default_call_kwargs, make_tiny_components, textured_image

from pipeline_deltadeno import DeltaDenoPipeline

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_half_precision_call(clip_tokenizer, dtype):
    pipe = DeltaDenoPipeline(**make_tiny_components(clip_tokenizer)).to("cuda", dtype)
    pipe.vae.register_to_config(force_upcast=True)
    pipe.set_progress_bar_config(disable=True)
    output = pipe(
        image=textured_image(0), **default_call_kwargs(output_type="pt", generator=torch.Generator("cuda").manual_seed(0))
    )
    assert torch.isfinite(output.images).all()
    assert torch.isfinite(output.localization_maps).all()
    assert output.empty_masks == [False]
    assert pipe.vae.dtype == dtype

