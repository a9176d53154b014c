"""Parity of the task heads with the original mPLUG code (recorded outputs in ../shared/reference)."""

from __future__ import annotations

import json

import pytest
import torch

from transformers_mplug import MPLUGForCaptioning, MPLUGForGrounding, MPLUGForQuestionAnswering, MPLUGForRetrieval
from transformers_mplug.original_checkpoint import config_from_original, load_original_state_dict

from .conftest import require_reference
from .fixture_checks import (
    check_caption,
    check_grounding,
    check_retrieval_evaluation,
    check_retrieval_training,
    check_videocap,
    check_videoqa,
    check_vqa,
    load,
)

BERT = {
    "vqa_base": "base",
    "vqa_large": "large",
    "caption_base": "base",
    "caption_large": "large",
    "videocap_large": "large",
    "retrieval_large": "large",
    "grounding_large": "large",
}


def build(
    model_class, folder_name: str, task: str, attn_implementation: str = "eager", checkpoint: str = "checkpoint.pth"
):
    folder = require_reference(folder_name)
    state = torch.load(folder / checkpoint, map_location="cpu", weights_only=True)
    state = state.get("model", state.get("module", state))
    bert = json.loads((folder.parent / "configs" / f"config_bert_tiny_{BERT[folder_name]}.json").read_text())
    model = model_class._from_config(config_from_original(bert, state), attn_implementation=attn_implementation)
    load_original_state_dict(model, state, task)
    return folder, model.eval(), state


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("name", ["vqa_base", "vqa_large"])
def test_vqa(name, attn_implementation):
    folder, model, _ = build(MPLUGForQuestionAnswering, name, "vqa", attn_implementation)
    check_vqa(model, folder)
    inputs, ref = load(folder)
    first = ref["rank_answer"]["first_token_logits"].softmax(-1)[:, inputs["answer_list_input_ids"][:, 1]]
    ranked = model.rank_answers(
        inputs["answer_list_input_ids"],
        pixel_values=inputs["image"],
        input_ids=inputs["question_input_ids"],
        attention_mask=inputs["question_attention_mask"],
        k=inputs["rank_k"],
    )
    torch.testing.assert_close(ranked.first_token_probabilities, first, atol=1e-5, rtol=1e-4)


def test_vqa_from_the_bf16_deepspeed_checkpoint():
    folder, model, _ = build(
        MPLUGForQuestionAnswering, "vqa_base", "vqa", checkpoint="deepspeed_ckpt/0.pt/mp_rank_00_model_states.pt"
    )
    assert all(p.dtype == torch.float32 for p in model.parameters())
    check_vqa(model, folder, ref_key="from_bf16_checkpoint")


def test_video_qa_ranking():
    _, model, _ = build(MPLUGForQuestionAnswering, "vqa_base", "vqa", "sdpa")
    check_videoqa(model, require_reference("videoqa_base"))


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("name", ["caption_base", "caption_large"])
def test_captioning(name, attn_implementation):
    folder, model, _ = build(MPLUGForCaptioning, name, "caption", attn_implementation)
    check_caption(model, folder)


def test_video_captioning_with_prompt():
    folder, model, _ = build(MPLUGForCaptioning, "videocap_large", "caption")
    check_videocap(model, folder)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_retrieval(attn_implementation):
    folder, model, state = build(MPLUGForRetrieval, "retrieval_large", "retrieval", attn_implementation)
    check_retrieval_evaluation(model, folder)
    queues = {k: state[k] for k in ("image_queue", "text_queue", "idx_queue")}
    check_retrieval_training(model, folder, queues)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_grounding(attn_implementation):
    folder, model, _ = build(MPLUGForGrounding, "grounding_large", "grounding", attn_implementation)
    check_grounding(model, folder)


def test_grounding_phrase_encoding_matches_the_original_dataset_code():
    from transformers_mplug import MPLUGProcessor

    folder = require_reference("tokenizer")
    inputs, ref = load(folder)
    processor = MPLUGProcessor.from_vocab_file(folder.parent / "configs" / "vocab.txt", image_size=14)
    encoded = processor.encode_phrases(inputs["grounding_phrases"], max_length=inputs["grounding_max_query_len"])
    assert torch.equal(encoded["input_ids"], ref["grounding_features"]["input_ids"])
    assert torch.equal(encoded["attention_mask"], ref["grounding_features"]["input_mask"])
    assert processor.coordinate_token_start_id == ref["special_token_ids"]["[unused340]"]
