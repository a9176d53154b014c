"""Checks of a model against the recorded outputs of the original mPLUG code, one function per fixture kind.

Used by the parity tests (models built from the original state dicts) and the conversion tests (folders written
by the converter), so that both prove the same numbers.
"""

from __future__ import annotations

from pathlib import Path

import torch

from transformers_mplug import original_hypothesis_scores

TOL = dict(atol=1e-5, rtol=1e-4)
# hypothesis scores of the original beam search (sums of ~25 log-probabilities, magnitudes ~10-50)
SCORE_TOL = dict(atol=1e-5, rtol=1e-6)


def load(folder: Path):
    return torch.load(folder / "inputs.pt", weights_only=True), torch.load(folder / "outputs.pt", weights_only=True)


def assert_ids_equal(ours: torch.Tensor, reference: torch.Tensor, pad_ids=(0, 102)) -> None:
    """`reference` is (B, 1, L) with -1 padding; ours (B, L') padded with [PAD]/[SEP]."""
    for row, ref in zip(ours.tolist(), reference[:, 0].tolist()):
        valid = [t for t in ref if t != -1]
        assert row[: len(valid)] == valid
        assert all(t in pad_ids for t in row[len(valid) :])


def assert_beam_equal(output, reference: dict) -> None:
    """`generate(..., return_dict_in_generate=True, output_scores=True)` against a recorded `generate_beam` /
    `generate_greedy` / `scst_beam` (ids `(B, R, L)` with -1 padding, scores `(B, R)`): every returned hypothesis,
    best first, ids exactly (the valid part; the rest is padding) and scores to `SCORE_TOL`."""
    ids = reference["ids"]
    batch, returned = ids.shape[:2]
    assert output.sequences.shape[0] == batch * returned
    sequences = output.sequences.view(batch, returned, -1)
    lengths = output.sequence_lengths.view(batch, returned)
    assert torch.equal(lengths, reference["lengths"])
    for b in range(batch):
        for r in range(returned):
            valid = ids[b, r, : reference["lengths"][b, r]].tolist()
            assert sequences[b, r].tolist()[: len(valid)] == valid, (b, r)
            assert all(t == 0 for t in sequences[b, r, len(valid) :].tolist())
    torch.testing.assert_close(output.sequences_scores.view(batch, returned), reference["scores"], **SCORE_TOL)


def beam_outputs(model, **inputs):
    return model.generate(**inputs, return_dict_in_generate=True, output_scores=True)


def question_inputs(inputs, image_key: str = "image") -> dict:
    return dict(
        pixel_values=inputs[image_key],
        input_ids=inputs["question_input_ids"],
        attention_mask=inputs["question_attention_mask"],
    )


def check_vqa(model, folder: Path, ref_key: str | None = None, tol: dict = TOL) -> None:
    """Teacher-forced logits and losses, greedy ids, answer ranking (optionally the `from_bf16_checkpoint` set)."""
    inputs, ref = load(folder)
    if ref_key:
        ref = ref[ref_key]
        ref = {
            "teacher_forced": {
                "logits": ref["teacher_forced_logits"],
                "loss_per_answer": ref["teacher_forced_loss_per_answer"],
            },
            "train": {"loss": ref["train_loss"]},
            **{k: ref[k] for k in ("generate_greedy", "generate_beam", "rank_answer")},
            "encoders": ref["encoders"],
        }
    labels = inputs["answer_input_ids"].masked_fill(inputs["answer_attention_mask"] == 0, -100)
    with torch.no_grad():
        out = model(
            **question_inputs(inputs), labels=labels, answers_per_question=inputs["k"], answer_weights=inputs["weights"]
        )
        trunk = model.mplug(**question_inputs(inputs))
    torch.testing.assert_close(trunk.fused_image_embeds, ref["encoders"]["fusion_image_output"], **tol)
    torch.testing.assert_close(trunk.fused_text_embeds, ref["encoders"]["fusion_text_output"], **tol)
    torch.testing.assert_close(out.logits, ref["teacher_forced"]["logits"], **tol)
    torch.testing.assert_close(out.loss_per_sequence, ref["teacher_forced"]["loss_per_answer"], **tol)
    torch.testing.assert_close(out.loss, ref["train"]["loss"], **tol)
    assert_ids_equal(model.generate(**question_inputs(inputs), num_beams=1), ref["generate_greedy"]["ids"])
    # the default decoding (no decoding arguments) is the original beam search: ids and scores
    assert_beam_equal(beam_outputs(model, **question_inputs(inputs)), ref["generate_beam"])
    assert_beam_equal(beam_outputs(model, **question_inputs(inputs), num_beams=1), ref["generate_greedy"])
    ranked = model.rank_answers(
        inputs["answer_list_input_ids"],
        inputs["answer_list_attention_mask"],
        **question_inputs(inputs),
        k=inputs["rank_k"],
    )
    assert torch.equal(ranked.indices, ref["rank_answer"]["topk_ids"])
    torch.testing.assert_close(ranked.probabilities, ref["rank_answer"]["topk_probs"], **tol)


def check_videoqa(model, folder: Path) -> None:
    inputs, ref = load(folder)
    with torch.no_grad():
        trunk = model.mplug(**question_inputs(inputs, "video"))
    torch.testing.assert_close(trunk.image_embeds, ref["encoders"]["image_embeds"], **TOL)
    torch.testing.assert_close(trunk.fused_image_embeds, ref["encoders"]["fusion_image_output"], **TOL)
    torch.testing.assert_close(trunk.fused_text_embeds, ref["encoders"]["fusion_text_output"], **TOL)
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


def check_caption(model, folder: Path) -> None:
    inputs, ref = load(folder)
    ids, mask = inputs["caption_input_ids"], inputs["caption_attention_mask"]
    with torch.no_grad():
        out = model(
            pixel_values=inputs["image"], input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)
        )
    torch.testing.assert_close(
        out.memory,
        ref["encoders"]["visual_output"]
        if model.mplug.vision_projection is None
        else model.mplug.vision_projection(ref["encoders"]["visual_output"]),
        **TOL,
    )
    torch.testing.assert_close(out.logits, ref["teacher_forced"]["logits"], **TOL)
    torch.testing.assert_close(out.loss, ref["train"]["loss"], **TOL)
    assert_ids_equal(model.generate(pixel_values=inputs["image"], num_beams=1), ref["generate_greedy"]["ids"])
    image = inputs["image"]
    assert_beam_equal(beam_outputs(model, pixel_values=image), ref["generate_beam"])
    assert_beam_equal(beam_outputs(model, pixel_values=image, num_beams=1), ref["generate_greedy"])
    # the SCST path: all 5 hypotheses, best first, and their scores with gradients
    scst = beam_outputs(model, pixel_values=image, num_return_sequences=ref["scst_beam"]["ids"].shape[1])
    assert_beam_equal(scst, ref["scst_beam"])
    returned = ref["scst_beam"]["ids"].shape[1]
    scores = original_hypothesis_scores(
        model, image.repeat_interleave(returned, 0), scst.sequences, scst.sequence_lengths, prompt_length=1
    )
    assert scores.requires_grad and ref["scst_beam"]["scores_require_grad"]
    torch.testing.assert_close(scores.detach().view(-1, returned), ref["scst_beam"]["scores"], **SCORE_TOL)


def check_videocap(model, folder: Path, decoding_from_folder: bool = False) -> None:
    """`decoding_from_folder`: the model's generation config holds the original's decoding (a converted folder:
    10 beams, 15-25 tokens, the prompt); otherwise they are passed explicitly."""
    inputs, ref = load(folder)
    ids, mask = inputs["teacher_forced_input_ids"], inputs["teacher_forced_attention_mask"]
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, : ref["prompt_length"]] = -100  # the original ignores its prompt positions
    with torch.no_grad():
        out = model(pixel_values=inputs["video"], input_ids=ids, attention_mask=mask, labels=labels)
    frames = ref["encoders"]["frame_image_embeds"]
    torch.testing.assert_close(out.memory, frames.reshape(1, -1, frames.shape[-1]), **TOL)
    torch.testing.assert_close(out.logits, ref["teacher_forced"]["logits"], **TOL)
    torch.testing.assert_close(out.loss, ref["teacher_forced"]["loss"], **TOL)
    greedy = model.generate(
        pixel_values=inputs["video"],
        input_ids=ref["prompt_ids_fed_to_generator"],
        num_beams=1,
        min_new_tokens=15,
        max_new_tokens=25,
    )
    assert_ids_equal(greedy, ref["generate_greedy"]["ids"])
    video = inputs["video"]
    if decoding_from_folder:
        assert_beam_equal(beam_outputs(model, pixel_values=video), ref["generate_beam"])
        assert_beam_equal(beam_outputs(model, pixel_values=video, num_beams=1), ref["generate_greedy"])
    else:
        explicit = dict(
            input_ids=ref["prompt_ids_fed_to_generator"], num_beams=10, min_new_tokens=15, max_new_tokens=25
        )
        assert_beam_equal(beam_outputs(model, pixel_values=video, **explicit), ref["generate_beam"])
        assert_beam_equal(
            beam_outputs(model, pixel_values=video, **{**explicit, "num_beams": 1}), ref["generate_greedy"]
        )


def check_retrieval_evaluation(model, folder: Path) -> None:
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


def check_retrieval_training(model, folder: Path, queues: dict[str, torch.Tensor]) -> None:
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
        alpha=inputs["alpha"],
        **queues,
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


def check_grounding(model, folder: Path) -> None:
    inputs, ref = load(folder)
    kwargs = dict(pixel_values=inputs["image"], input_ids=inputs["word_id"], attention_mask=inputs["word_mask"])
    with torch.no_grad():
        out = model(**kwargs, boxes=inputs["targets_cxcywh"])
    train = ref["train"]
    assert torch.equal(model.boxes_to_tokens(inputs["targets_cxcywh"]), train["target_tokens"])
    start = model.config.coordinate_token_start_id
    coordinates = slice(start, start + model.config.num_coordinate_bins)
    torch.testing.assert_close(out.logits[..., coordinates], train["teacher_forced_logits"][..., coordinates], **TOL)
    torch.testing.assert_close(out.logits, train["teacher_forced_logits"], atol=5e-3, rtol=1e-4)
    torch.testing.assert_close(out.token_loss.flatten(), train["token_loss_unweighted"], **TOL)
    torch.testing.assert_close(out.loss, train["loss_seq"], **TOL)
    prediction = model.predict_boxes(**kwargs)
    evaluation = ref["eval"]
    assert torch.equal(prediction.pred_tokens, evaluation["pred_tokens"])
    assert torch.equal(prediction.pred_boxes, evaluation["pred_box"])
    torch.testing.assert_close(prediction.logits[..., coordinates], evaluation["step_logits"][..., coordinates], **TOL)
