"""DeltaDenoPipeline behaviour on tiny random components: the method's steps and the diffusers call contract."""

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import default_call_kwargs, make_tiny_components, textured_image
from diffusers.models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor2_0

from attention_processors import DeltaDenoAttnProcessor
from pipeline_deltadeno import DeltaDenoPipeline, DeltaDenoPipelineOutput


class UNetCallRecorder:
    """Forward pre-hook on the UNet that records the batch size of every call."""

    def __init__(self, unet):
        self.batch_sizes = []
        self.handle = unet.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        self.batch_sizes.append(sample.shape[0])

    def remove(self):
        self.handle.remove()


def run(pipe, image, **overrides):
    return pipe(image=image, **default_call_kwargs(**overrides))


def to_uint8(array):
    return np.round(np.asarray(array) * 255).astype(np.uint8)


# ---------------------------------------------------------------------------
# The method's steps


def test_call_unet_batches_per_phase(tiny_pipe, good_image):
    recorder = UNetCallRecorder(tiny_pipe.unet)
    run(tiny_pipe, [good_image, textured_image(1)], num_inference_steps=10, strength=0.8, attribution_fraction=0.4)
    recorder.remove()
    # 8 denoising steps: round(0.4 * 8) = 3 attribution steps, then 5 inpainting steps.
    assert recorder.batch_sizes == [6] * 3 + [4] * 5


def test_call_normal_as_negative_uses_two_conditions(tiny_pipe, good_image):
    recorder = UNetCallRecorder(tiny_pipe.unet)
    run(tiny_pipe, good_image, num_inference_steps=10, strength=0.8, normal_as_negative=True)
    recorder.remove()
    assert recorder.batch_sizes == [2] * 8


def test_call_without_guidance(tiny_pipe, good_image):
    recorder = UNetCallRecorder(tiny_pipe.unet)
    run(tiny_pipe, good_image, num_inference_steps=10, strength=0.8, guidance_scale=1.0)
    recorder.remove()
    assert recorder.batch_sizes == [2] * 3 + [1] * 5


def test_call_mask_image_skips_attribution(tiny_pipe, good_image):
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[8:20, 10:22] = 255
    recorder = UNetCallRecorder(tiny_pipe.unet)
    output = run(tiny_pipe, good_image, mask_image=PIL.Image.fromarray(mask), num_inference_steps=10)
    recorder.remove()
    assert recorder.batch_sizes == [2] * 8
    assert output.localization_maps is None
    assert np.array_equal(output.masks[0] > 0.5, mask > 127)


def test_call_output_equals_input_outside_feathered_mask(tiny_pipe, good_image):
    output = run(tiny_pipe, good_image, feather_sigma=1.0)
    mask = torch.from_numpy(output.masks)[:, None]
    assert 0 < float(mask.mean()) < 0.5
    # The feather reaches ceil(3 * sigma) = 3 pixels beyond the mask.
    reach = torch.nn.functional.max_pool2d(mask, 7, stride=1, padding=3)[0, 0].numpy() > 0
    result = to_uint8(output.images[0])
    original = np.asarray(good_image)
    assert np.array_equal(result[~reach], original[~reach])
    assert not np.array_equal(result[reach], original[reach])


def test_call_mask_change_matches_outputs(tiny_pipe, good_image):
    output = run(tiny_pipe, good_image)
    inside = output.masks[0] > 0.5
    change = np.abs(output.images[0] - np.asarray(good_image) / 255.0)[inside].mean()
    assert output.mask_change[0] == pytest.approx(change, abs=1e-4)
    assert output.mask_change[0] > 0


def test_call_localization_map_per_image(tiny_pipe, good_image):
    output = run(tiny_pipe, [good_image, textured_image(3)], generator=[torch.Generator().manual_seed(s) for s in (0, 1)])
    maps = output.localization_maps
    assert maps.shape == (2, 32, 32)
    assert maps.dtype == np.float32
    # Normalized per image at latent resolution, then upsampled bilinearly.
    for single in maps:
        assert 0.0 <= single.min() < 0.1
        assert 0.9 < single.max() <= 1.0
    # The mask is the top of the map: its mean inside is above its mean outside.
    inside = output.masks[0] > 0.5
    assert maps[0][inside].mean() > maps[0][~inside].mean()


def test_call_object_mask_confines_defect(tiny_pipe, good_image):
    object_mask = np.zeros((32, 32), dtype=bool)
    object_mask[16:, 16:] = True
    output = run(tiny_pipe, good_image, object_mask=object_mask, mask_dilation=2)
    assert output.masks[0].sum() > 0
    assert output.masks[0][~object_mask].sum() == 0


def test_call_empty_mask_reported_when_branches_agree(tiny_pipe, good_image):
    embeds, _ = tiny_pipe.encode_prompt("a photo of a bottle", "cpu", 1, False)
    output = run(
        tiny_pipe, good_image, prompt_embeds=embeds, anomaly_prompt_embeds=embeds.clone(), anomaly_token_weight=1.0
    )
    assert output.empty_masks == [True]
    assert output.mask_change == [0.0]
    assert output.masks[0].sum() == 0
    assert np.array_equal(to_uint8(output.images[0]), np.asarray(good_image))


def test_call_attention_bias_changes_output(tiny_pipe, good_image):
    with_bias = run(tiny_pipe, good_image, output_type="pt")
    without = run(tiny_pipe, good_image, output_type="pt", attention_bias_inside=0.0, attention_bias_outside=0.0)
    assert torch.equal(with_bias.masks, without.masks)
    assert not torch.allclose(with_bias.images, without.images, atol=1e-4)


def test_call_processors_installed_only_on_cross_attention(tiny_pipe, good_image):
    seen = {}

    def callback(pipe, step, timestep, kwargs):
        for name, processor in pipe.unet.attn_processors.items():
            seen[name] = type(processor)
        return {}

    run(tiny_pipe, good_image, callback_on_step_end=callback)
    assert all((cls is DeltaDenoAttnProcessor) == name.endswith("attn2.processor") for name, cls in seen.items())
    assert any(cls is DeltaDenoAttnProcessor for cls in seen.values())
    assert all(type(p) is AttnProcessor2_0 for p in tiny_pipe.unet.attn_processors.values())


# ---------------------------------------------------------------------------
# Reproducibility and batching


def test_call_same_seed_same_output(tiny_pipe, good_image):
    first = run(tiny_pipe, good_image, output_type="pt")
    second = run(tiny_pipe, good_image, output_type="pt")
    assert torch.equal(first.images, second.images)
    assert torch.equal(first.masks, second.masks)


def test_call_other_seed_other_output(tiny_pipe, good_image):
    first = run(tiny_pipe, good_image, output_type="pt")
    second = run(tiny_pipe, good_image, output_type="pt", generator=torch.Generator().manual_seed(1))
    assert not torch.equal(first.images, second.images)


def test_call_batch_equals_single(tiny_pipe):
    images = [textured_image(0), textured_image(5)]
    batch = run(tiny_pipe, images, generator=[torch.Generator().manual_seed(s) for s in (0, 1)], output_type="pt")
    for index, seed in enumerate((0, 1)):
        single = run(tiny_pipe, images[index], generator=torch.Generator().manual_seed(seed), output_type="pt")
        assert torch.allclose(batch.images[index], single.images[0], atol=1e-4)
        assert torch.equal(batch.masks[index], single.masks[0])


def test_call_num_images_per_prompt(tiny_pipe):
    images = [textured_image(0), textured_image(5)]
    output = run(tiny_pipe, images, num_images_per_prompt=3, generator=None, output_type="pt")
    assert output.images.shape == (6, 3, 32, 32)
    assert output.masks.shape == (6, 1, 32, 32)
    assert len(output.mask_change) == 6
    assert len(output.anomaly_tokens) == 6
    assert not torch.equal(output.images[0], output.images[1])


def test_call_latents_argument_is_the_noise(tiny_pipe, good_image):
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(7))
    from_noise = run(tiny_pipe, good_image, latents=noise, output_type="pt")
    from_generator = run(tiny_pipe, good_image, generator=torch.Generator().manual_seed(7), output_type="pt")
    assert torch.equal(from_noise.images, from_generator.images)


def test_call_prompt_lists(tiny_pipe):
    images = [textured_image(0), textured_image(5)]
    output = run(
        tiny_pipe,
        images,
        prompt=["a photo of a bottle", "a photo of a cable"],
        anomaly_prompt=["a photo of a bottle with a crack", "a photo of a cable with a cut"],
        generator=None,
    )
    assert output.anomaly_tokens[1] == ["with</w>", "a</w>", "cut</w>"]


# ---------------------------------------------------------------------------
# Output contract


@pytest.mark.parametrize("output_type", ["pil", "np", "pt"])
def test_call_output_containers(tiny_pipe, good_image, output_type):
    output = run(tiny_pipe, good_image, output_type=output_type)
    assert isinstance(output, DeltaDenoPipelineOutput)
    if output_type == "pil":
        assert isinstance(output.images[0], PIL.Image.Image)
        assert output.images[0].size == (32, 32)
        assert output.masks[0].mode == "L"
        assert set(np.unique(np.asarray(output.masks[0]))) <= {0, 255}
    elif output_type == "np":
        assert output.images.shape == (1, 32, 32, 3)
        assert output.masks.shape == (1, 32, 32)
        assert set(np.unique(output.masks)) <= {0.0, 1.0}
    else:
        assert output.images.shape == (1, 3, 32, 32)
        assert output.masks.shape == (1, 1, 32, 32)
        assert isinstance(output.localization_maps, torch.Tensor)


def test_call_latent_output(tiny_pipe, good_image):
    output = run(tiny_pipe, good_image, output_type="latent")
    assert output.images.shape == (1, 4, 16, 16)
    assert output.masks.shape == (1, 1, 16, 16)
    decoded = tiny_pipe.decode_to_pixels(output.images)
    assert decoded.shape == (1, 3, 32, 32)


def test_call_tuple_equals_dict(tiny_pipe, good_image):
    as_dict = run(tiny_pipe, good_image, output_type="pt")
    as_tuple = run(tiny_pipe, good_image, output_type="pt", return_dict=False)
    assert isinstance(as_tuple, tuple)
    assert len(as_tuple) == 7
    assert torch.equal(as_tuple[0], as_dict.images)
    assert torch.equal(as_tuple[1], as_dict.masks)
    assert as_tuple[4] == as_dict.empty_masks


def test_call_non_square_image(tiny_pipe):
    image = textured_image(2, size=(24, 40))
    output = run(tiny_pipe, image, output_type="pt")
    assert output.images.shape == (1, 3, 24, 40)
    assert output.masks.shape == (1, 1, 24, 40)


def test_call_height_width_resize(tiny_pipe):
    image = textured_image(2, size=(30, 30))
    output = run(tiny_pipe, image, height=32, width=32)
    assert output.images.shape == (1, 32, 32, 3)


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "I;16"])
def test_call_image_modes_converted(tiny_pipe, mode):
    rgb = textured_image(4)
    if mode == "I;16":
        gray = np.asarray(rgb.convert("L")).astype(np.uint16) * 257
        image = PIL.Image.fromarray(gray)
        assert image.mode == "I;16"
    else:
        image = rgb.convert(mode)
    output = run(tiny_pipe, image)
    assert output.images.shape == (1, 32, 32, 3)
    if mode in ("L", "I;16"):
        gray_output = run(tiny_pipe, rgb.convert("L").convert("RGB"))
        assert np.allclose(output.images, gray_output.images, atol=1e-5)


# ---------------------------------------------------------------------------
# Callbacks and the diffusers contract


def test_call_callback_every_step_and_latents_replaced(tiny_pipe, good_image):
    steps = []

    def callback(pipe, step, timestep, kwargs):
        steps.append((step, kwargs["latents"].shape, kwargs["anomaly_prompt_embeds"].shape))
        return {"latents": kwargs["latents"] * 0} if step == 0 else {}

    output = run(
        tiny_pipe,
        good_image,
        num_inference_steps=10,
        callback_on_step_end=callback,
        callback_on_step_end_tensor_inputs=["latents", "anomaly_prompt_embeds"],
        output_type="pt",
    )
    assert [s for s, _, _ in steps] == list(range(8))
    assert steps[0][1] == (1, 4, 16, 16)
    assert steps[0][2] == (1, 77, 32)
    plain = run(tiny_pipe, good_image, num_inference_steps=10, output_type="pt")
    assert not torch.equal(output.images, plain.images)


def test_call_unknown_callback_input_raises(tiny_pipe, good_image):
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        run(tiny_pipe, good_image, callback_on_step_end_tensor_inputs=["noise_pred"])


def test_encode_prompt_alone(tiny_pipe):
    embeds, negative = tiny_pipe.encode_prompt("a photo of a bottle", "cpu", 2, True, negative_prompt="blurry")
    assert embeds.shape == (2, 77, 32)
    assert negative.shape == (2, 77, 32)
    reference, _ = tiny_pipe.encode_prompt("a photo of a bottle", "cpu", 1, False)
    assert torch.allclose(embeds[0], reference[0])


def test_call_precomputed_embeds_match_prompts(tiny_pipe, good_image):
    embeds, negative = tiny_pipe.encode_prompt("a photo of a bottle", "cpu", 1, True)
    anomaly, _ = tiny_pipe.encode_prompt("a photo of a bottle with a crack", "cpu", 1, False)
    from_embeds = run(
        tiny_pipe, good_image, prompt_embeds=embeds, negative_prompt_embeds=negative, anomaly_prompt_embeds=anomaly,
        output_type="pt",
    )
    from_prompts = run(tiny_pipe, good_image, output_type="pt")
    assert torch.allclose(from_embeds.images, from_prompts.images, atol=1e-5)


@pytest.mark.parametrize("scheduler_name", ["ddim", "dpm", "euler", "pndm"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_call_schedulers_and_prediction_types(clip_tokenizer, good_image, scheduler_name, prediction_type):
    pipe = DeltaDenoPipeline(**make_tiny_components(clip_tokenizer, prediction_type, scheduler_name))
    pipe.set_progress_bar_config(disable=True)
    output = run(pipe, good_image, num_inference_steps=8, output_type="pt")
    assert torch.isfinite(output.images).all()
    assert output.empty_masks == [False]
    # Outside the feathered mask the input comes back exactly.
    reach = torch.nn.functional.max_pool2d(output.masks, 13, stride=1, padding=6) == 0
    original = torch.from_numpy(np.asarray(good_image)).permute(2, 0, 1)[None] / 255.0
    assert torch.allclose(output.images[reach.expand_as(output.images)], original[reach.expand_as(original)], atol=1e-6)


# ---------------------------------------------------------------------------
# Processor restoration and shared UNets


def test_from_pipe_shared_unet_bit_identical_after_call(tiny_components, good_image):
    from diffusers import StableDiffusionImg2ImgPipeline

    img2img = StableDiffusionImg2ImgPipeline(**tiny_components, requires_safety_checker=False)
    img2img.set_progress_bar_config(disable=True)

    def img2img_output():
        return img2img(
            "a photo of a bottle", image=good_image, num_inference_steps=4, strength=0.8, output_type="pt",
            generator=torch.Generator().manual_seed(0),
        ).images

    before = img2img_output()
    pipe = DeltaDenoPipeline.from_pipe(img2img)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.unet is img2img.unet
    run(pipe, good_image)
    assert torch.equal(img2img_output(), before)


def test_processors_restored_after_error_mid_loop(tiny_components, good_image):
    from diffusers import StableDiffusionPipeline

    sd = StableDiffusionPipeline(**tiny_components, requires_safety_checker=False)
    sd.set_progress_bar_config(disable=True)

    def sd_output():
        return sd("a photo", num_inference_steps=3, height=32, width=32, output_type="pt",
                  generator=torch.Generator().manual_seed(0)).images

    before_processors = dict(sd.unet.attn_processors)
    before = sd_output()
    pipe = DeltaDenoPipeline.from_pipe(sd)
    pipe.set_progress_bar_config(disable=True)

    def failing_callback(pipe, step, timestep, kwargs):
        if step == 4:  # inside phase 2, with the bias active
            raise RuntimeError("stop here")
        return {}

    with pytest.raises(RuntimeError, match="stop here"):
        run(pipe, good_image, num_inference_steps=10, callback_on_step_end=failing_callback)
    after_processors = sd.unet.attn_processors
    assert all(after_processors[name] is processor for name, processor in before_processors.items())
    assert torch.equal(sd_output(), before)


def test_ip_adapter_processor_rejected_before_unet(tiny_pipe, good_image):
    processors = dict(tiny_pipe.unet.attn_processors)
    name = next(n for n in processors if n.endswith("attn2.processor"))
    processors[name] = IPAdapterAttnProcessor2_0(hidden_size=32, cross_attention_dim=32)
    tiny_pipe.unet.set_attn_processor(processors)
    recorder = UNetCallRecorder(tiny_pipe.unet)
    with pytest.raises(ValueError, match="IP-Adapter"):
        run(tiny_pipe, good_image)
    recorder.remove()
    assert recorder.batch_sizes == []


# ---------------------------------------------------------------------------
# Bad input: clear errors before any UNet call


BAD_INPUTS = [
    (dict(anomaly_prompt="a photo of a bottle"), ValueError, "identical"),
    (dict(prompt="   "), ValueError, "`prompt` must not be empty"),
    (dict(anomaly_prompt=""), ValueError, "`anomaly_prompt` must not be empty"),
    (dict(prompt=["a", "b"]), ValueError, "equal length"),
    (dict(strength=0.0), ValueError, r"`strength` must be in \(0, 1\]"),
    (dict(strength=1.5), ValueError, "`strength`"),
    (dict(attribution_fraction=1.0), ValueError, "`attribution_fraction`"),
    (dict(num_inference_steps=2, strength=0.5), ValueError, "at least 2"),
    (dict(output_type="tensor"), ValueError, "`output_type` must be one of"),
    (dict(mask_threshold_method="mean"), ValueError, "`mask_threshold_method`"),
    (dict(mask_threshold=1.5), ValueError, "`mask_threshold`"),
    (dict(max_area_fraction=0.0), ValueError, "max_area_fraction"),
    (dict(mask_dilation=-1), ValueError, "`mask_dilation`"),
    (dict(anomaly_token_weight=float("nan")), ValueError, "`anomaly_token_weight`"),
    (dict(end_token_source="both"), ValueError, "`end_token_source`"),
    (dict(guidance_scale=float("inf")), ValueError, "`guidance_scale`"),
    (dict(num_images_per_prompt=0), ValueError, "`num_images_per_prompt`"),
    (dict(generator=[torch.Generator()] * 2), ValueError, "one generator per generation"),
    (dict(latents=torch.zeros(1, 4, 8, 8)), ValueError, "`latents`"),
    (dict(latents=torch.full((1, 4, 16, 16), float("nan"))), ValueError, "NaN"),
    (dict(mask_image=np.zeros((32, 32), dtype=np.uint8)), ValueError, "all zero"),
    (dict(mask_image=np.ones((16, 16), dtype=np.uint8)), ValueError, "must match the image size"),
    (dict(object_mask=np.zeros((32, 32), dtype=bool)), ValueError, "`object_mask` 0 is all zero"),
    (dict(prompt_embeds=torch.full((1, 77, 32), float("nan"))), ValueError, "`prompt_embeds` contains NaN"),
    (dict(height=31, width=31), ValueError, "multiple of the VAE scale factor"),
    (dict(height=32), ValueError, "both `height` and `width`"),
    (dict(prompt=None), ValueError, "are required"),
    (dict(prompt=3), TypeError, "`prompt` must be a string"),
]


@pytest.mark.parametrize("overrides, error, message", BAD_INPUTS)
def test_call_bad_input_raises_before_unet(tiny_pipe, good_image, overrides, error, message):
    recorder = UNetCallRecorder(tiny_pipe.unet)
    with pytest.raises(error, match=message):
        run(tiny_pipe, good_image, **overrides)
    recorder.remove()
    assert recorder.batch_sizes == []


@pytest.mark.parametrize(
    "image, message",
    [
        (textured_image(0, size=(31, 32)), "not a multiple of the VAE's scale factor 2; pass `height=30`"),
        ([textured_image(0), textured_image(0, size=(32, 40))], "same size"),
        (np.full((32, 32, 3), np.nan, dtype=np.float32), "NaN"),
        (np.full((32, 32, 3), 2.0, dtype=np.float32), r"must lie in \[0, 1\]"),
        ("image.png", "must be a PIL image"),
        ([], "empty list"),
        (None, "`image` is required"),
    ],
)
def test_call_bad_image_raises_before_unet(tiny_pipe, image, message):
    recorder = UNetCallRecorder(tiny_pipe.unet)
    with pytest.raises((ValueError, TypeError), match=message):
        run(tiny_pipe, image)
    recorder.remove()
    assert recorder.batch_sizes == []
