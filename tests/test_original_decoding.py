"""The original mPLUG beam search as `decoding_mode="original"` of `generate()`: behaviour on tiny models, the
recorded evaluation answers through the pipeline, bad input. (Every recorded `generate_beam` / `generate_greedy` /
`scst_beam` is compared in `fixture_checks`, run by the parity and conversion tests.)"""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import GenerationConfig, pipeline
from transformers.generation import GenerateBeamDecoderOnlyOutput

from transformers_mplug import (
    MPLUGBeamSearchOutput,
    MPLUGForCaptioning,
    MPLUGForQuestionAnswering,
    gnmt_length_penalty,
)

from .conftest import require_reference, tiny_config, tiny_inputs
from .fixture_checks import load
from .test_conversion import convert

EOS = 102 % 128


def _with_likely_sep(model):
    with torch.no_grad():  # [SEP] competes, so that beams finish at different steps
        model.text_decoder.cls.predictions.bias[EOS] += 2.5
    return model.eval()


@pytest.fixture(scope="module")
def qa_model():
    torch.manual_seed(0)
    return _with_likely_sep(MPLUGForQuestionAnswering(tiny_config()))


def _beam(model, **kwargs):
    return model.generate(**kwargs, return_dict_in_generate=True, output_scores=True)


def test_default_generation_configs_select_the_original_mode(qa_model, tmp_path):
    assert qa_model.generation_config.decoding_mode == "original"
    captioner = MPLUGForCaptioning(tiny_config())
    assert captioner.generation_config.decoding_mode == "original"
    qa_model.save_pretrained(tmp_path)
    assert GenerationConfig.from_pretrained(tmp_path).decoding_mode == "original"
    loaded = MPLUGForQuestionAnswering.from_pretrained(tmp_path).eval()
    inputs = tiny_inputs(qa_model.config)
    out = _beam(loaded, **inputs)
    assert isinstance(out, MPLUGBeamSearchOutput)
    torch.testing.assert_close(out.sequences_scores, _beam(qa_model, **inputs).sequences_scores)


def test_transformers_mode_is_one_setting_away(qa_model, tmp_path):
    inputs = tiny_inputs(qa_model.config)
    theirs = _beam(qa_model, **inputs, decoding_mode="transformers")
    assert type(theirs) is GenerateBeamDecoderOnlyOutput
    # transformers' score is the log-probability divided by the length (length_penalty 1), not the GNMT penalty
    ours = _beam(qa_model, **inputs)
    assert not torch.allclose(theirs.sequences_scores, ours.sequences_scores)
    # saved in the generation config, it is the folder's default
    qa_model.generation_config.decoding_mode = "transformers"
    try:
        qa_model.save_pretrained(tmp_path)
    finally:
        qa_model.generation_config.decoding_mode = "original"
    loaded = MPLUGForQuestionAnswering.from_pretrained(tmp_path).eval()
    assert type(_beam(loaded, **inputs)) is GenerateBeamDecoderOnlyOutput
    # a generation config without the setting (written before it existed) keeps transformers' decoding
    plain = GenerationConfig(num_beams=3, max_new_tokens=4, eos_token_id=EOS, pad_token_id=0, bos_token_id=101 % 128)
    assert type(qa_model.generate(**inputs, generation_config=plain, return_dict_in_generate=True)) is (
        GenerateBeamDecoderOnlyOutput
    )


def test_scores_are_the_gnmt_normalised_log_probabilities(qa_model):
    inputs = tiny_inputs(qa_model.config)
    out = _beam(qa_model, **inputs, num_beams=4, num_return_sequences=4, max_new_tokens=6)
    assert out.sequences.shape[0] == 3 * 4
    scores = out.sequences_scores.view(3, 4)
    assert torch.all(scores[:, :-1] >= scores[:, 1:])  # best first
    # the per-step scores and beam indices recompose each hypothesis: sum of its token log-probs / penalty
    transition = qa_model.text_decoder.compute_transition_scores(out.sequences, out.scores, out.beam_indices)
    generated = out.sequence_lengths - 1
    for row in range(out.sequences.shape[0]):
        total = transition[row, : generated[row]].sum()
        torch.testing.assert_close(total / gnmt_length_penalty(int(generated[row])), out.sequences_scores[row])
    assert torch.all(out.sequences[:, 0] == qa_model.config.bos_token_id)
    for row, length in enumerate(out.sequence_lengths.tolist()):
        assert torch.all(out.sequences[row, length:] == qa_model.config.pad_token_id)


def test_an_item_ends_when_its_best_beam_ends(qa_model):
    inputs = tiny_inputs(qa_model.config)
    out = _beam(qa_model, **inputs, max_new_tokens=8)
    for row, length in enumerate(out.sequence_lengths.tolist()):
        ids = out.sequences[row, :length].tolist()
        # the best hypothesis either ends with [SEP] or ran to the last step
        assert ids[-1] == EOS or length == 1 + 8


def test_min_new_tokens_bans_sep(qa_model):
    out = _beam(qa_model, **tiny_inputs(qa_model.config), min_new_tokens=4, max_new_tokens=6)
    assert not (out.sequences[:, 1:5] == EOS).any()
    assert torch.all(out.sequence_lengths >= 1 + 5)


def test_uses_the_kv_cache_not_the_whole_prefix(qa_model):
    lengths = []
    handle = qa_model.text_decoder.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    try:
        qa_model.generate(**tiny_inputs(qa_model.config), min_new_tokens=5, max_new_tokens=5)
        assert lengths == [1] * 5  # [CLS], then one new token per step
        lengths.clear()
        qa_model.generate(**tiny_inputs(qa_model.config), min_new_tokens=5, max_new_tokens=5, use_cache=False)
        assert lengths == [1, 2, 3, 4, 5]  # without a cache: the whole prefix, as the original
    finally:
        handle.remove()


@pytest.mark.parametrize("num_beams", [1, 4])
def test_batched_equals_one_by_one_with_padded_questions(qa_model, num_beams):
    inputs = tiny_inputs(qa_model.config, padded=True)
    batched = _beam(qa_model, **inputs, num_beams=num_beams, num_return_sequences=num_beams, max_new_tokens=6)
    for row in range(3):
        keep = int(inputs["attention_mask"][row].sum())
        single = _beam(
            qa_model,
            pixel_values=inputs["pixel_values"][row : row + 1],
            input_ids=inputs["input_ids"][row : row + 1, :keep],
            num_beams=num_beams,
            num_return_sequences=num_beams,
            max_new_tokens=6,
        )
        rows = slice(row * num_beams, (row + 1) * num_beams)
        assert torch.equal(batched.sequence_lengths[rows], single.sequence_lengths)
        for mine, theirs, length in zip(batched.sequences[rows], single.sequences, single.sequence_lengths):
            assert mine[:length].tolist() == theirs[:length].tolist()
        torch.testing.assert_close(batched.sequences_scores[rows], single.sequences_scores, atol=1e-5, rtol=1e-5)


def test_eager_equals_sdpa():
    outputs = []
    for implementation in ("eager", "sdpa"):
        torch.manual_seed(0)
        model = MPLUGForQuestionAnswering._from_config(tiny_config(), attn_implementation=implementation)
        outputs.append(_beam(_with_likely_sep(model), **tiny_inputs(model.config), num_return_sequences=5))
    assert torch.equal(outputs[0].sequences, outputs[1].sequences)
    torch.testing.assert_close(outputs[0].sequences_scores, outputs[1].sequences_scores, atol=1e-5, rtol=1e-5)


def test_captioner_image_video_prompt_and_folder_prompt(tmp_path):
    torch.manual_seed(0)
    model = _with_likely_sep(MPLUGForCaptioning(tiny_config()))
    pixels = torch.randn(2, 3, 32, 32)
    single = _beam(model, pixel_values=pixels[:1], max_new_tokens=9)
    batched = _beam(model, pixel_values=pixels, max_new_tokens=9)
    length = int(single.sequence_lengths[0])
    assert batched.sequences[0, :length].tolist() == single.sequences[0, :length].tolist()
    prompt = torch.tensor([[101 % 128, 7, 8]])
    prompted = _beam(model, pixel_values=pixels, input_ids=prompt, min_new_tokens=1, max_new_tokens=4)
    assert torch.all(prompted.sequences[:, :3] == prompt)
    video = _beam(
        model, pixel_values=torch.randn(1, 2, 3, 32, 32), input_ids=prompt, min_new_tokens=1, max_new_tokens=4
    )
    assert video.sequences.shape[0] == 1
    # a folder's `decoder_prompt_ids` (the video captioner's prompt) is used when no prompt is passed
    model.generation_config.decoder_prompt_ids = prompt[0].tolist()
    model.generation_config.min_new_tokens, model.generation_config.max_new_tokens = 1, 4
    model.save_pretrained(tmp_path)
    loaded = MPLUGForCaptioning.from_pretrained(tmp_path).eval()
    from_folder = _beam(loaded, pixel_values=pixels)
    assert torch.equal(from_folder.sequences, prompted.sequences)
    loaded.generation_config.decoder_prompt_ids = [5, 6]
    with pytest.raises(ValueError, match="decoder_prompt_ids"):
        loaded.generate(pixel_values=pixels)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(decoding_mode="hf_beam"), r"decoding_mode.*\['original', 'transformers'\]"),
        (dict(num_beams=0), "num_beams"),
        (dict(min_new_tokens=5, max_new_tokens=3), "min_new_tokens"),
        (dict(max_new_tokens=100), "max_new_tokens.*max_position_embeddings"),
        (dict(do_sample=True), "do_sample"),
        (dict(num_beams=2, num_return_sequences=3), "num_return_sequences"),
        (dict(length_penalty=2.0), "length_penalty"),
        (dict(custom_generate=lambda *a, **k: None), "custom_generate"),
    ],
)
def test_bad_decoding_arguments_raise_naming_the_argument(qa_model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        qa_model.generate(**tiny_inputs(qa_model.config), **kwargs)


def test_limits_hold_in_transformers_mode_too(qa_model):
    inputs = tiny_inputs(qa_model.config)
    for kwargs, match in ((dict(num_beams=0), "num_beams"), (dict(max_new_tokens=100), "max_new_tokens")):
        with pytest.raises(ValueError, match=match):
            qa_model.generate(**inputs, decoding_mode="transformers", **kwargs)
    # the longest allowed answer runs
    positions = qa_model.text_decoder.config.max_position_embeddings
    qa_model.generate(**inputs, num_beams=1, max_new_tokens=positions, min_new_tokens=positions)


def test_streamer_is_refused_rather_than_ignored(qa_model):
    from transformers import TextStreamer

    class Tokenizer:
        def decode(self, *args, **kwargs):
            return ""

    with pytest.raises(ValueError, match="streamer"):
        qa_model.generate(**tiny_inputs(qa_model.config, batch_size=1), num_beams=1, streamer=TextStreamer(Tokenizer()))


@pytest.mark.parametrize("fixture", ["vqa_base", "vqa_large"])
def test_recorded_evaluation_answers_through_the_pipeline(tmp_path, fixture):
    out = tmp_path / fixture
    bert = "base" if fixture.endswith("base") else "large"
    convert(out, "vqa", f"{fixture}/checkpoint.pth", fixture, bert)
    inputs, ref = load(require_reference(fixture))
    vqa = pipeline("visual-question-answering", model=str(out))
    size = vqa.image_processor.size["height"]
    for row, expected in enumerate(ref["evaluation_fn_result"]):
        # the pipeline tokenises the question as the original
        keep = int(inputs["question_attention_mask"][row].sum())
        preprocessed = vqa.preprocess({"image": Image.new("RGB", (size, size)), "question": inputs["questions"][row]})
        assert preprocessed["input_ids"][0].tolist() == inputs["question_input_ids"][row, :keep].tolist()
        # the recorded images are already-normalised random tensors: feed them to the pipeline's model step
        model_inputs = {
            "pixel_values": inputs["image"][row : row + 1],
            "input_ids": inputs["question_input_ids"][row : row + 1, :keep],
            "attention_mask": inputs["question_attention_mask"][row : row + 1, :keep],
        }
        answers = vqa.postprocess(vqa.forward(model_inputs, generate_kwargs={}, top_k=1))
        assert answers[0]["answer"] == expected["answer"]
