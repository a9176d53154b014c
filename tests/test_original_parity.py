"""Parity of the trunk with the original mPLUG code (recorded outputs in ../shared/reference)."""

from __future__ import annotations

import json

import pytest
import torch

from transformers_mplug import MPLUGModel, MPLUGProcessor
from transformers_mplug.original_checkpoint import (
    config_from_original,
    load_original_trunk,
    map_original_trunk_state_dict,
    unwrap_original_checkpoint,
)

from .conftest import require_reference

TOL = dict(atol=1e-5, rtol=1e-4)
TASKS = {"vqa_base": "base", "vqa_large": "large"}


def _load(task: str, checkpoint: str = "checkpoint.pth"):
    folder = require_reference(task)
    state = unwrap_original_checkpoint(torch.load(folder / checkpoint, map_location="cpu", weights_only=True))
    bert = json.loads((folder.parent / "configs" / f"config_bert_tiny_{TASKS.get(task, 'base')}.json").read_text())
    return folder, state, bert


def _trunk_state(state: dict) -> dict:
    return {k: v for k, v in state.items() if not k.startswith("text_decoder.")}


def _build(task: str, attn_implementation: str, checkpoint: str = "checkpoint.pth"):
    folder, state, bert = _load(task, checkpoint)
    config = config_from_original(bert, state)
    model = MPLUGModel._from_config(config, attn_implementation=attn_implementation).eval()
    mapping = load_original_trunk(model, _trunk_state(state))
    return folder, model, mapping


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("task", ["vqa_base", "vqa_large"])
def test_trunk_matches_original(task, attn_implementation):
    folder, model, _ = _build(task, attn_implementation)
    inputs = torch.load(folder / "inputs.pt", weights_only=True)
    reference = torch.load(folder / "outputs.pt", weights_only=True)["encoders"]
    with torch.no_grad():
        out = model(
            pixel_values=inputs["image"],
            input_ids=inputs["question_input_ids"],
            attention_mask=inputs["question_attention_mask"],
        )
    torch.testing.assert_close(out.vision_last_hidden_state, reference["visual_output"], **TOL)
    torch.testing.assert_close(out.text_embeds, reference["text_embeds"], **TOL)
    torch.testing.assert_close(out.fused_image_embeds, reference["fusion_image_output"], **TOL)
    torch.testing.assert_close(out.fused_text_embeds, reference["fusion_text_output"], **TOL)


def test_schedules_read_from_the_original_configs():
    _, base, _ = _build("vqa_base", "eager")
    _, large, _ = _build("vqa_large", "eager")
    base_bert = _load("vqa_base")[2]
    assert len(base.config.cross_modal_layer_types) == base_bert["fusion_layers"]
    assert base.config.cross_modal_layer_types.count("connected_attention") == 1
    assert large.config.cross_modal_layer_types.count("connected_attention") == 0
    assert base.vision_projection is None and large.vision_projection is not None


def test_video_trunk_matches_original():
    folder = require_reference("videoqa_base")
    _, model, _ = _build("vqa_base", "sdpa")
    inputs = torch.load(folder / "inputs.pt", weights_only=True)
    reference = torch.load(folder / "outputs.pt", weights_only=True)["encoders"]
    with torch.no_grad():
        out = model(
            pixel_values=inputs["video"],
            input_ids=inputs["question_input_ids"],
            attention_mask=inputs["question_attention_mask"],
        )
    torch.testing.assert_close(out.image_embeds, reference["image_embeds"], **TOL)
    torch.testing.assert_close(out.fused_image_embeds, reference["fusion_image_output"], **TOL)
    torch.testing.assert_close(out.fused_text_embeds, reference["fusion_text_output"], **TOL)


def test_bf16_deepspeed_file_maps_and_matches_its_recorded_outputs():
    folder, model, _ = _build("vqa_base", "eager", "deepspeed_ckpt/0.pt/mp_rank_00_model_states.pt")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    inputs = torch.load(folder / "inputs.pt", weights_only=True)
    reference = torch.load(folder / "outputs.pt", weights_only=True)["from_bf16_checkpoint"]["encoders"]
    with torch.no_grad():
        out = model(
            pixel_values=inputs["image"],
            input_ids=inputs["question_input_ids"],
            attention_mask=inputs["question_attention_mask"],
        )
    torch.testing.assert_close(out.fused_image_embeds, reference["fusion_image_output"], **TOL)
    torch.testing.assert_close(out.fused_text_embeds, reference["fusion_text_output"], **TOL)


def test_mapping_reports_dead_weights_and_keeps_the_decoder_for_the_heads():
    _, state, bert = _load("vqa_base")
    config = config_from_original(bert, state)
    mapping = map_original_trunk_state_dict(state, config)
    reasons = set(mapping.dropped)
    assert {
        "CLIP text tower (unused)",
        "CLIP projection (unused)",
        "fusion layers built but never run",
        "fusion embeddings/pooler (never run)",
        "cross-attention of connected-attention layers (unused)",
        "training-only state (momentum copies, queues)",
    } <= reasons
    assert "visual_encoder.visual.proj" in mapping.dropped["CLIP projection (unused)"]
    assert any(
        k.startswith("fusion_encoder.encoder.layer.0.") for k in mapping.dropped["fusion layers built but never run"]
    )
    assert mapping.unmapped and all(k.startswith("text_decoder.") for k in mapping.unmapped)
    # the fused q/k/v of CLIP is split in order q, k, v
    qkv = state["visual_encoder.visual.transformer.resblocks.0.attn.in_proj_weight"]
    width = qkv.shape[1]
    for index, name in enumerate(("q_proj", "k_proj", "v_proj")):
        mapped = mapping.state_dict[f"vision_model.encoder.layers.0.self_attn.{name}.weight"]
        assert torch.equal(mapped, qkv[index * width : (index + 1) * width])


def test_unknown_key_and_missing_weight_fail_naming_the_key():
    _, state, bert = _load("vqa_large")
    config = config_from_original(bert, state)
    trunk = _trunk_state(state)
    with pytest.raises(ValueError, match="mystery_head.weight"):
        load_original_trunk(MPLUGModel(config), {**trunk, "mystery_head.weight": torch.zeros(2)})
    missing = dict(trunk)
    del missing["text_encoder.encoder.layer.0.output.dense.weight"]
    with pytest.raises(ValueError, match=r"text_model\.encoder\.layer\.0\.output\.dense\.weight"):
        load_original_trunk(MPLUGModel(config), missing)
    bad_shape = {**trunk, "visn_fc.bias": torch.zeros(3)}
    with pytest.raises(ValueError, match="vision_projection.dense.bias"):
        load_original_trunk(MPLUGModel(config), bad_shape)
    with pytest.raises(ValueError, match="cannot be placed"):
        load_original_trunk(MPLUGModel(config), state)  # decoder keys are not part of the trunk


def test_module_prefix_and_pretraining_prefixes_are_accepted():
    _, state, bert = _load("vqa_large")
    trunk = _trunk_state(state)
    wrapped = {"module": {"module." + k.replace("text_encoder.", "text_encoder.bert.", 1): v for k, v in trunk.items()}}
    config = config_from_original(bert, state)
    model = MPLUGModel(config)
    load_original_trunk(model, unwrap_original_checkpoint(wrapped))
    assert torch.equal(
        model.text_model.embeddings.word_embeddings.weight, trunk["text_encoder.embeddings.word_embeddings.weight"]
    )


@pytest.mark.parametrize("task", ["vqa_base", "vqa_large", "videoqa_base"])
def test_processor_token_ids_equal_recorded_ones(task):
    folder = require_reference(task)
    processor = MPLUGProcessor.from_vocab_file(folder.parent / "configs" / "vocab.txt", image_size=16)
    inputs = torch.load(folder / "inputs.pt", weights_only=True)
    batch = processor(text=inputs["questions"])
    assert torch.equal(batch["input_ids"], inputs["question_input_ids"])
    assert torch.equal(batch["attention_mask"], inputs["question_attention_mask"])
    answers = processor.encode_text([a for a in inputs["answer_list"]], add_eos=True)
    assert torch.equal(answers["input_ids"], inputs["answer_list_input_ids"])
    if "answers" in inputs:
        targets = processor.encode_text(inputs["answers"])
        assert torch.equal(targets["input_ids"], inputs["answer_input_ids"])
    for question, ids in zip(inputs["questions"], inputs["tokenized"]["questions"]):
        assert processor.encode_text(question, return_tensors=None)["input_ids"][0] == ids
