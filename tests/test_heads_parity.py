"""Parity of the decoder heads with the original mPLUG code (recorded outputs in ../shared/reference)."""

from __future__ import annotations

import json

import pytest
import torch

from transformers_mplug import MPLUGForCaptioning, MPLUGForQuestionAnswering
from transformers_mplug.original_checkpoint import (
    config_from_original,
    load_original_state_dict,
    unwrap_original_checkpoint,
)

from .conftest import require_reference

TOL = dict(atol=1e-5, rtol=1e-4)
BERT = {
    "vqa_base": "base",
    "vqa_large": "large",
    "caption_base": "base",
    "caption_large": "large",
    "videocap_large": "large",
}


def build(
    model_class, folder_name: str, task: str, attn_implementation: str = "eager", checkpoint: str = "checkpoint.pth"
):
    folder = require_reference(folder_name)
    state = unwrap_original_checkpoint(torch.load(folder / checkpoint, map_location="cpu", weights_only=True))
    bert = json.loads((folder.parent / "configs" / f"config_bert_tiny_{BERT[folder_name]}.json").read_text())
    model = model_class._from_config(config_from_original(bert, state), attn_implementation=attn_implementation)
    load_original_state_dict(model, state, task)
    return folder, model.eval()


def load(folder):
    return (torch.load(folder / "inputs.pt", weights_only=True), torch.load(folder / "outputs.pt", weights_only=True))


def assert_ids_equal(ours: torch.Tensor, reference: torch.Tensor, pad_ids=(0, 102)):
    """`reference` is (B, 1, L) with -1 padding; ours (B, L') padded with [PAD]/[SEP]."""
    for row, ref in zip(ours.tolist(), reference[:, 0].tolist()):
        valid = [t for t in ref if t != -1]
        assert row[: len(valid)] == valid
        assert all(t in pad_ids for t in row[len(valid) :])


def question_inputs(inputs, image_key="image"):
    return dict(
        pixel_values=inputs[image_key],
        input_ids=inputs["question_input_ids"],
        attention_mask=inputs["question_attention_mask"],
    )


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("name", ["vqa_base", "vqa_large"])
def test_vqa_teacher_forced_loss_greedy_and_ranking(name, attn_implementation):
    folder, model = build(MPLUGForQuestionAnswering, name, "vqa", attn_implementation)
    inputs, ref = load(folder)
    labels = inputs["answer_input_ids"].masked_fill(inputs["answer_attention_mask"] == 0, -100)
    with torch.no_grad():
        out = model(
            **question_inputs(inputs),
            labels=labels,
            decoder_input_ids=inputs["answer_input_ids"],
            decoder_attention_mask=inputs["answer_attention_mask"],
            answers_per_question=inputs["k"],
            answer_weights=inputs["weights"],
        )
    torch.testing.assert_close(out.logits, ref["teacher_forced"]["logits"], **TOL)
    torch.testing.assert_close(out.loss_per_sequence, ref["teacher_forced"]["loss_per_answer"], **TOL)
    torch.testing.assert_close(out.loss, ref["train"]["loss"], **TOL)

    greedy = model.generate(**question_inputs(inputs), num_beams=1)
    assert_ids_equal(greedy, ref["generate_greedy"]["ids"])

    ranked = model.rank_answers(
        inputs["answer_list_input_ids"],
        inputs["answer_list_attention_mask"],
        **question_inputs(inputs),
        k=inputs["rank_k"],
    )
    assert torch.equal(ranked.indices, ref["rank_answer"]["topk_ids"])
    torch.testing.assert_close(ranked.probabilities, ref["rank_answer"]["topk_probs"], **TOL)
    first = ref["rank_answer"]["first_token_logits"].softmax(-1)[:, inputs["answer_list_input_ids"][:, 1]]
    torch.testing.assert_close(ranked.first_token_probabilities, first, **TOL)


def test_vqa_from_the_bf16_deepspeed_checkpoint():
    folder, model = build(
        MPLUGForQuestionAnswering, "vqa_base", "vqa", checkpoint="deepspeed_ckpt/0.pt/mp_rank_00_model_states.pt"
    )
    inputs, ref = load(folder)
    ref = ref["from_bf16_checkpoint"]
    labels = inputs["answer_input_ids"].masked_fill(inputs["answer_attention_mask"] == 0, -100)
    with torch.no_grad():
        out = model(
            **question_inputs(inputs), labels=labels, answers_per_question=inputs["k"], answer_weights=inputs["weights"]
        )
    torch.testing.assert_close(out.logits, ref["teacher_forced_logits"], **TOL)
    torch.testing.assert_close(out.loss, ref["train_loss"], **TOL)
    assert_ids_equal(model.generate(**question_inputs(inputs), num_beams=1), ref["generate_greedy"]["ids"])
    ranked = model.rank_answers(inputs["answer_list_input_ids"], **question_inputs(inputs), k=inputs["rank_k"])
    assert torch.equal(ranked.indices, ref["rank_answer"]["topk_ids"])


def test_video_qa_ranking():
    _, model = build(MPLUGForQuestionAnswering, "vqa_base", "vqa", "sdpa")
    folder = require_reference("videoqa_base")
    inputs, ref = load(folder)
    ranked = model.rank_answers(
        inputs["answer_list_input_ids"],
        inputs["answer_list_attention_mask"],
        **question_inputs(inputs, "video"),
        k=inputs["rank_k"],
    )
    assert torch.equal(ranked.indices, ref["rank_answer"]["topk_ids"])
    torch.testing.assert_close(ranked.probabilities, ref["rank_answer"]["topk_probs"], **TOL)
    best = [inputs["answer_list"][i] for i in ranked.indices[:, 0].tolist()]
    assert best == ref["rank_answer"]["predicted_answer"]


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("name", ["caption_base", "caption_large"])
def test_captioning_teacher_forced_loss_and_greedy(name, attn_implementation):
    folder, model = build(MPLUGForCaptioning, name, "caption", attn_implementation)
    inputs, ref = load(folder)
    ids, mask = inputs["caption_input_ids"], inputs["caption_attention_mask"]
    with torch.no_grad():
        out = model(
            pixel_values=inputs["image"], input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)
        )
    torch.testing.assert_close(out.logits, ref["teacher_forced"]["logits"], **TOL)
    torch.testing.assert_close(out.loss, ref["train"]["loss"], **TOL)
    assert_ids_equal(model.generate(pixel_values=inputs["image"], num_beams=1), ref["generate_greedy"]["ids"])


def test_video_captioning_with_prompt():
    folder, model = build(MPLUGForCaptioning, "videocap_large", "caption")
    inputs, ref = load(folder)
    ids, mask = inputs["teacher_forced_input_ids"], inputs["teacher_forced_attention_mask"]
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, : ref["prompt_length"]] = -100  # the original ignores its prompt positions
    with torch.no_grad():
        out = model(pixel_values=inputs["video"], input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(out.logits, ref["teacher_forced"]["logits"], **TOL)
    torch.testing.assert_close(out.loss, ref["teacher_forced"]["loss"], **TOL)
    prompt = ref["prompt_ids_fed_to_generator"]
    greedy = model.generate(
        pixel_values=inputs["video"], input_ids=prompt, num_beams=1, min_new_tokens=15, max_new_tokens=25
    )
    assert_ids_equal(greedy, ref["generate_greedy"]["ids"])


def test_retrieval_training_losses_with_recorded_negatives_queue_and_momentum_features():
    from transformers_mplug import MPLUGForRetrieval

    folder = require_reference("retrieval_large")
    state = unwrap_original_checkpoint(torch.load(folder / "checkpoint.pth", map_location="cpu", weights_only=True))
    bert = json.loads((folder.parent / "configs" / "config_bert_tiny_large.json").read_text())
    model = MPLUGForRetrieval._from_config(config_from_original(bert, state), attn_implementation="eager").eval()
    load_original_state_dict(model, state, "retrieval")
    inputs, ref = load(folder)
    train = ref["train"]
    normalize = torch.nn.functional.normalize
    kwargs = dict(
        pixel_values=inputs["train_image"],
        input_ids=inputs["train_input_ids"],
        attention_mask=inputs["train_attention_mask"],
        idx=inputs["train_idx"],
        image_features_m=normalize(train["vision_proj_m_cls"], dim=-1),
        text_features_m=normalize(train["text_proj_m_cls"], dim=-1),
        image_queue=state["image_queue"],
        text_queue=state["text_queue"],
        idx_queue=state["idx_queue"],
        alpha=inputs["alpha"],
    )
    batch = inputs["train_idx"].numel()
    draws = train["multinomial_draws"]
    with torch.no_grad():
        out = model(**kwargs, negative_image_indices=draws[:batch], negative_text_indices=draws[batch:])
    torch.testing.assert_close(out.loss_itc, train["loss_ita"], **TOL)
    torch.testing.assert_close(out.loss_itm, train["loss_itm"], **TOL)
    torch.testing.assert_close(out.itm_logits, train["itm_logits"], **TOL)
    torch.testing.assert_close(out.image_features, normalize(train["vision_proj_cls"], dim=-1), **TOL)
    torch.testing.assert_close(out.text_features, normalize(train["text_proj_cls"], dim=-1), **TOL)
    torch.manual_seed(inputs["multinomial_seed"])  # the same RNG stream draws the same negatives
    with torch.no_grad():
        drawn = model(**kwargs)
    assert torch.equal(torch.cat([drawn.negative_image_indices, drawn.negative_text_indices]), draws)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_retrieval_evaluation_rankings_and_scores(attn_implementation):
    from transformers_mplug import MPLUGForRetrieval

    folder = require_reference("retrieval_large")
    state = unwrap_original_checkpoint(torch.load(folder / "checkpoint.pth", map_location="cpu", weights_only=True))
    bert = json.loads((folder.parent / "configs" / "config_bert_tiny_large.json").read_text())
    model = MPLUGForRetrieval._from_config(config_from_original(bert, state), attn_implementation=attn_implementation)
    load_original_state_dict(model.eval(), state, "retrieval")
    inputs, ref = load(folder)
    evaluation = ref["evaluation"]
    result = model.retrieve(
        pixel_values=inputs["eval_image"],
        input_ids=inputs["eval_text_input_ids"],
        attention_mask=inputs["eval_text_attention_mask"],
        k=inputs["k_test"],
        batch_size=2,
    )
    torch.testing.assert_close(result.similarity, evaluation["itc_sims_i2t"], **TOL)
    assert torch.equal(result.image_to_text_indices, evaluation["ranking_i2t"])
    assert torch.equal(result.text_to_image_indices, evaluation["ranking_t2i"])
    torch.testing.assert_close(
        result.image_to_text_scores, evaluation["score_matrix_i2t"].gather(1, evaluation["ranking_i2t"]), **TOL
    )
    torch.testing.assert_close(
        result.text_to_image_scores, evaluation["score_matrix_t2i"].gather(1, evaluation["ranking_t2i"]), **TOL
    )
    pixels = inputs["eval_image"].repeat_interleave(4, 0)
    logits = model.match_pairs(
        pixels, inputs["eval_text_input_ids"].repeat(3, 1), inputs["eval_text_attention_mask"].repeat(3, 1)
    )
    torch.testing.assert_close(logits.view(3, 4, 2), ref["itm_all_pairs"]["logits"], **TOL)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_grounding_boxes_and_loss(attn_implementation):
    from transformers_mplug import MPLUGForGrounding

    folder = require_reference("grounding_large")
    state = unwrap_original_checkpoint(torch.load(folder / "checkpoint.pth", map_location="cpu", weights_only=True))
    bert = json.loads((folder.parent / "configs" / "config_bert_tiny_large.json").read_text())
    model = MPLUGForGrounding._from_config(config_from_original(bert, state), attn_implementation=attn_implementation)
    load_original_state_dict(model.eval(), state, "grounding")
    inputs, ref = load(folder)
    kwargs = dict(pixel_values=inputs["image"], input_ids=inputs["word_id"], attention_mask=inputs["word_mask"])
    with torch.no_grad():
        out = model(**kwargs, boxes=inputs["targets_cxcywh"])
    train = ref["train"]
    assert torch.equal(model.boxes_to_tokens(inputs["targets_cxcywh"]), train["target_tokens"])
    coordinates = slice(
        model.config.coordinate_token_start_id,
        model.config.coordinate_token_start_id + model.config.num_coordinate_bins,
    )
    torch.testing.assert_close(out.logits[..., coordinates], train["teacher_forced_logits"][..., coordinates], **TOL)
    torch.testing.assert_close(out.logits, train["teacher_forced_logits"], atol=5e-3, rtol=1e-4)
    torch.testing.assert_close(out.token_loss.flatten(), train["token_loss_unweighted"], **TOL)
    torch.testing.assert_close(out.loss, train["loss_seq"], **TOL)
    pred = model.predict_boxes(**kwargs)
    evaluation = ref["eval"]
    assert torch.equal(pred.pred_tokens, evaluation["pred_tokens"])
    assert torch.equal(pred.pred_boxes, evaluation["pred_box"])
    torch.testing.assert_close(pred.logits[..., coordinates], evaluation["step_logits"][..., coordinates], **TOL)


def test_grounding_phrase_encoding_matches_the_original_dataset_code():
    from transformers_mplug import MPLUGProcessor

    folder = require_reference("tokenizer")
    inputs, ref = load(folder)
    processor = MPLUGProcessor.from_vocab_file(folder.parent / "configs" / "vocab.txt", image_size=14)
    encoded = processor.encode_phrases(inputs["grounding_phrases"], max_length=inputs["grounding_max_query_len"])
    assert torch.equal(encoded["input_ids"], ref["grounding_features"]["input_ids"])
    assert torch.equal(encoded["attention_mask"], ref["grounding_features"]["input_mask"])
    assert processor.coordinate_token_start_id == ref["special_token_ids"]["[unused340]"]
