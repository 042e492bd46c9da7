"""Prompt alignment and token-level refinement, with the real CLIP tokenizer."""

import pytest
import torch

from pipeline_deltadeno import align_prompt_tokens, prompt_token_ids


def anomaly_token_strings(pipe, prompt, anomaly_prompt):
    return pipe.find_anomaly_tokens(prompt, anomaly_prompt).anomaly_tokens


def test_alignment_suffix_defect(tiny_pipe):
    tokens = anomaly_token_strings(tiny_pipe, "a photo of a bottle", "a photo of a bottle with a crack")
    assert tokens == ["with</w>", "a</w>", "crack</w>"]


def test_alignment_defect_in_the_middle(tiny_pipe):
    tokens = anomaly_token_strings(tiny_pipe, "a photo of a bottle on a table", "a photo of a cracked bottle on a table")
    assert tokens == ["cracked</w>"]


def test_alignment_multi_token_object_names(tiny_pipe):
    alignment = tiny_pipe.find_anomaly_tokens(
        "a photo of a metal_nut", "a photo of a metal_nut with a scratch"
    )
    assert alignment.anomaly_tokens == ["with</w>", "a</w>", "scratch</w>"]
    # metal_nut splits into metal, _, nut; all three are shared, so all are matched.
    matched_anomaly_positions = {a for _, a in alignment.pairs}
    assert {5, 6, 7} <= matched_anomaly_positions


def test_alignment_multi_token_defect_word(tiny_pipe):
    tokens = anomaly_token_strings(tiny_pipe, "a photo of a screw_bag", "a photo of a screw_bag with a broken_zipper")
    assert "broken</w>" in tokens
    assert "zipper</w>" in tokens
    assert "screw</w>" not in tokens


def test_alignment_positions_index_encoder_sequence(tiny_pipe):
    alignment = tiny_pipe.find_anomaly_tokens("a photo of a bottle", "a photo of a bottle with a crack")
    ids = tiny_pipe.tokenizer("a photo of a bottle with a crack").input_ids
    assert tiny_pipe.tokenizer.convert_ids_to_tokens([ids[i] for i in alignment.anomaly_positions]) == [
        "with</w>",
        "a</w>",
        "crack</w>",
    ]
    assert alignment.anomaly_end == len(ids) - 1
    assert alignment.pairs[0] == (0, 0)


def test_alignment_identical_prompts_raise(tiny_pipe):
    with pytest.raises(ValueError, match="identical"):
        tiny_pipe.find_anomaly_tokens("a photo of a bottle", "a photo of a bottle")


def test_alignment_removed_words_only_raise(tiny_pipe):
    with pytest.raises(ValueError, match="adds no tokens"):
        tiny_pipe.find_anomaly_tokens("a photo of a bottle with a crack", "a photo of a bottle")


def test_alignment_defect_beyond_token_limit_raises(tiny_pipe):
    long_prompt = "a photo of a bottle " + "on a very long wooden table " * 15
    with pytest.raises(ValueError, match="within the first 77 tokens"):
        tiny_pipe.find_anomaly_tokens(long_prompt, long_prompt + " with a crack")


def test_alignment_long_prompt_defect_inside_limit(tiny_pipe):
    tail = "on a very long wooden table " * 15
    tokens = anomaly_token_strings(tiny_pipe, "a photo of a bottle " + tail, "a photo of a cracked bottle " + tail)
    assert tokens == ["cracked</w>"]


def test_align_prompt_tokens_replacement():
    pairs, unmatched = align_prompt_tokens([1, 2, 3, 4], [1, 2, 9, 9, 4])
    assert pairs == [(0, 0), (1, 1), (3, 4)]
    assert unmatched == [2, 3]


def test_prompt_token_ids_strip_special_tokens(clip_tokenizer):
    ids = prompt_token_ids(clip_tokenizer, "a photo")
    assert clip_tokenizer.bos_token_id not in ids
    assert clip_tokenizer.eos_token_id not in ids
    assert len(ids) == 2


def test_refine_copies_shared_rows_and_scales_anomaly_rows(tiny_pipe):
    alignment = tiny_pipe.find_anomaly_tokens("a photo of a bottle", "a photo of a bottle with a crack")
    normal = torch.randn(1, 77, 32)
    anomaly = torch.randn(1, 77, 32)
    refined, columns = tiny_pipe.refine_anomaly_embeds(normal, anomaly, [alignment], 2.0, "anomaly")
    for n, a in alignment.pairs:
        assert torch.equal(refined[0, a], normal[0, n])
    for position in alignment.anomaly_positions:
        assert torch.allclose(refined[0, position], 2.0 * anomaly[0, position])
    assert columns[0].nonzero().flatten().tolist() == alignment.anomaly_positions
    end = alignment.anomaly_end
    assert torch.equal(refined[0, end:], anomaly[0, end:])


def test_refine_end_rows_from_normal(tiny_pipe):
    alignment = tiny_pipe.find_anomaly_tokens("a photo of a bottle", "a photo of a bottle with a crack")
    normal = torch.randn(1, 77, 32)
    anomaly = torch.randn(1, 77, 32)
    refined, _ = tiny_pipe.refine_anomaly_embeds(normal, anomaly, [alignment], 1.0, "normal")
    assert torch.equal(refined[0, alignment.anomaly_end], normal[0, alignment.normal_end])
    shift = alignment.anomaly_end - alignment.normal_end
    assert torch.equal(refined[0, 76], normal[0, 76 - shift])
