"""MPLUGForQuestionAnswering: loss, generate, rank_answers, common behaviour."""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig
from transformers.cache_utils import EncoderDecoderCache

from transformers_mplug import MPLUGForQuestionAnswering, MPLUGModel

from .common import MPLUGGenerationTesterMixin, MPLUGModelTesterMixin
from .conftest import tiny_config, tiny_inputs

BOS, EOS = 101 % 128, 102 % 128


def answers(num: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (num, 4), generator=generator)
    ids[:, 0], ids[:, -1] = BOS, EOS
    ids[1::2, -2:] = torch.tensor([EOS, -100])  # shorter answers, padded with -100
    return ids


class TestQuestionAnsweringCommon(MPLUGModelTesterMixin):
    model_class = MPLUGForQuestionAnswering

    def make_inputs(self, config, **kwargs):
        inputs = tiny_inputs(config, **kwargs)
        inputs["labels"] = answers(inputs["input_ids"].shape[0])
        return inputs

    def output_tensors(self, output, inputs):
        labels = inputs["labels"] if inputs is not None else None
        logits = output.logits if labels is None else output.logits * (labels != -100)[..., None]
        return {"logits": logits, "loss_per_sequence": output.loss_per_sequence}

    def loss_fn(self, output):
        return output.loss


def test_weighted_multi_answer_loss_is_the_original_formula():
    model = MPLUGForQuestionAnswering(tiny_config()).eval()
    inputs = tiny_inputs(model.config, batch_size=2)
    labels = answers(3)
    weights = torch.tensor([0.6, 0.4, 1.0])
    with torch.no_grad():
        out = model(**inputs, labels=labels, answers_per_question=[2, 1], answer_weights=weights)
        same = model(**inputs, labels=labels, answer_question_index=torch.tensor([0, 0, 1]), answer_weights=weights)
    logp = out.logits[:, :-1].log_softmax(-1)
    targets = labels[:, 1:]
    nll = -(logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0] * (targets != -100)).sum(1)
    torch.testing.assert_close(out.loss_per_sequence, nll, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, (weights * nll).sum() / 2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, same.loss, atol=0, rtol=0)


def test_answers_attend_to_their_own_question():
    model = MPLUGForQuestionAnswering(tiny_config()).eval()
    inputs = tiny_inputs(model.config, batch_size=2)
    labels = answers(3)
    with torch.no_grad():
        grouped = model(**inputs, labels=labels, answers_per_question=[2, 1])
        alone = model(**{k: v[1:] for k, v in inputs.items()}, labels=labels[2:])
    torch.testing.assert_close(grouped.loss_per_sequence[2:], alone.loss_per_sequence, atol=1e-5, rtol=1e-5)


def test_single_answer_training_reduces_loss():
    torch.manual_seed(0)
    model = MPLUGForQuestionAnswering(tiny_config()).train()
    inputs = tiny_inputs(model.config, batch_size=2)
    labels = answers(2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss = model(**inputs, labels=labels).loss
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(labels=None), "labels"),
        (dict(labels=answers(3)), "answer_question_index"),
        (dict(labels=answers(3), answers_per_question=[1, 1]), "answers_per_question"),
        (dict(labels=answers(3), answers_per_question=[3, 0]), "answers_per_question"),
        (dict(labels=answers(3), answers_per_question=[1, 1, 1]), "answers_per_question"),
        (dict(labels=answers(3), answer_question_index=torch.tensor([0, 1, 5])), "answer_question_index"),
        (
            dict(labels=answers(3), answers_per_question=[2, 1], answer_question_index=torch.tensor([0, 1, 1])),
            "not both",
        ),
        (dict(labels=answers(3), answers_per_question=[2, 1], answer_weights=torch.ones(2)), "answer_weights"),
    ],
)
def test_bad_answer_arguments_raise(kwargs, match):
    model = MPLUGForQuestionAnswering(tiny_config()).eval()
    inputs = tiny_inputs(model.config, batch_size=2)
    with pytest.raises(ValueError, match=match):
        model(**inputs, **kwargs)


def test_lm_head_is_tied_and_stays_tied_after_loading(tmp_path):
    model = MPLUGForQuestionAnswering(tiny_config())
    decoder = model.text_decoder
    assert decoder.cls.predictions.decoder.weight is decoder.bert.embeddings.word_embeddings.weight
    model.save_pretrained(tmp_path)
    loaded = MPLUGForQuestionAnswering.from_pretrained(tmp_path)
    d = loaded.text_decoder
    assert d.cls.predictions.decoder.weight is d.bert.embeddings.word_embeddings.weight
    assert torch.equal(d.cls.predictions.decoder.bias, d.cls.predictions.bias)


def test_pretrained_trunk_loads_into_the_head(tmp_path):
    trunk = MPLUGModel(tiny_config()).eval()
    trunk.save_pretrained(tmp_path)
    head, info = MPLUGForQuestionAnswering.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["unexpected_keys"]
    assert info["missing_keys"] and all(k.startswith("text_decoder.") for k in info["missing_keys"])
    for name, tensor in trunk.state_dict().items():
        assert torch.equal(head.mplug.state_dict()[name], tensor), name


# ------------------------------------------------------------------------------------------------ generate
@pytest.fixture(scope="module")
def qa_model():
    torch.manual_seed(0)
    model = MPLUGForQuestionAnswering(tiny_config()).eval()
    with torch.no_grad():  # make [SEP] likely so that answers end at different steps
        model.text_decoder.cls.predictions.bias[EOS] += 3.0
    return model


def test_can_generate_and_default_generation_config(qa_model, tmp_path):
    assert MPLUGForQuestionAnswering.can_generate()
    config = qa_model.generation_config
    assert (config.num_beams, config.max_new_tokens, config.min_new_tokens) == (5, 10, 1)
    assert (config.bos_token_id, config.eos_token_id, config.decoder_start_token_id) == (BOS, EOS, BOS)
    qa_model.save_pretrained(tmp_path)
    assert GenerationConfig.from_pretrained(tmp_path).num_beams == 5
    assert MPLUGForQuestionAnswering.from_pretrained(tmp_path).generation_config.max_new_tokens == 10


def test_generate_starts_with_cls_and_stops_at_sep(qa_model):
    inputs = tiny_inputs(qa_model.config)
    del inputs["pixel_values"]
    inputs["pixel_values"] = tiny_inputs(qa_model.config)["pixel_values"]
    for num_beams in (1, 3):
        out = qa_model.generate(**inputs, num_beams=num_beams, max_new_tokens=6)
        assert out.shape[0] == 3 and out.shape[1] <= 7
        assert torch.all(out[:, 0] == BOS)
        for row in out.tolist():
            if EOS in row:
                tail = row[row.index(EOS) + 1 :]
                assert all(t in (EOS, qa_model.config.pad_token_id) for t in tail)


def test_encodes_image_and_question_once_per_call(qa_model, monkeypatch):
    calls = {"vision": 0, "text": 0}
    vision_forward = qa_model.mplug.vision_model.forward
    text_forward = qa_model.mplug.text_model.forward

    def count_vision(*args, **kwargs):
        calls["vision"] += 1
        return vision_forward(*args, **kwargs)

    def count_text(*args, **kwargs):
        calls["text"] += 1
        return text_forward(*args, **kwargs)

    monkeypatch.setattr(qa_model.mplug.vision_model, "forward", count_vision)
    monkeypatch.setattr(qa_model.mplug.text_model, "forward", count_text)
    qa_model.generate(**tiny_inputs(qa_model.config), num_beams=4, max_new_tokens=5, min_new_tokens=5)
    assert calls == {"vision": 1, "text": 1}


def test_kv_cache_gives_same_result_as_no_cache(qa_model):
    inputs = tiny_inputs(qa_model.config)
    with_cache = qa_model.generate(
        **inputs, num_beams=3, max_new_tokens=6, output_scores=True, return_dict_in_generate=True
    )
    without = qa_model.generate(
        **inputs, num_beams=3, max_new_tokens=6, use_cache=False, output_scores=True, return_dict_in_generate=True
    )
    assert torch.equal(with_cache.sequences, without.sequences)
    torch.testing.assert_close(with_cache.sequences_scores, without.sequences_scores, atol=1e-5, rtol=1e-5)
    cache = with_cache.get("cache", with_cache.get("past_key_values"))
    assert isinstance(cache, EncoderDecoderCache)
    assert cache.cross_attention_cache.get_seq_length() == qa_model.config.num_image_tokens + 7
    # the memory's keys/values are held once per image (3), not once per beam copy (3 x 3)
    assert cache.cross_attention_cache.layers[0].keys.shape[0] == 3
    assert cache.self_attention_cache.layers[0].keys.shape[0] == 9


def test_padded_batch_gives_same_answers_as_one_by_one(qa_model):
    inputs = tiny_inputs(qa_model.config, padded=True)
    for num_beams in (1, 4):
        batched = qa_model.generate(**inputs, num_beams=num_beams, max_new_tokens=6)
        for row in range(3):
            keep = int(inputs["attention_mask"][row].sum())
            single = qa_model.generate(
                pixel_values=inputs["pixel_values"][row : row + 1],
                input_ids=inputs["input_ids"][row : row + 1, :keep],
                num_beams=num_beams,
                max_new_tokens=6,
            )
            length = single.shape[1]
            assert batched[row, :length].tolist() == single[0].tolist()
            assert all(t in (EOS, 0) for t in batched[row, length:].tolist())


def test_min_length_sampling_and_scores(qa_model):
    inputs = tiny_inputs(qa_model.config)
    out = qa_model.generate(**inputs, num_beams=1, min_new_tokens=4, max_new_tokens=4)
    assert out.shape[1] == 5 and not (out[:, 1:] == EOS).any()
    torch.manual_seed(0)
    sampled = qa_model.generate(
        **inputs,
        decoding_mode="transformers",
        do_sample=True,
        num_beams=1,
        top_k=5,
        max_new_tokens=5,
        output_scores=True,
        return_dict_in_generate=True,
    )
    assert len(sampled.scores) == sampled.sequences.shape[1] - 1
    assert sampled.scores[0].shape == (3, qa_model.config.vocab_size)


def test_generate_with_video_inputs(qa_model):
    inputs = tiny_inputs(qa_model.config, batch_size=2)
    inputs["pixel_values"] = torch.randn(2, 3, 3, 32, 32)
    assert qa_model.generate(**inputs, num_beams=2, max_new_tokens=3).shape[0] == 2


def test_generate_accepts_token_type_ids_and_rejects_decoder_inputs(qa_model):
    inputs = tiny_inputs(qa_model.config)
    qa_model.generate(**inputs, token_type_ids=torch.zeros_like(inputs["input_ids"]), max_new_tokens=2)
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        qa_model.generate(**inputs, encoder_hidden_states=torch.zeros(1))
    with pytest.raises(ValueError, match="input_ids"):
        qa_model.generate(pixel_values=inputs["pixel_values"])


# ------------------------------------------------------------------------------------------------ rank_answers
def candidates(num: int = 6) -> torch.Tensor:
    ids = torch.zeros(num, 4, dtype=torch.long)
    ids[:, 0] = BOS
    ids[:, 1] = torch.arange(10, 10 + num)
    ids[:, 2] = EOS
    ids[::2, 2] = torch.arange(40, 40 + (num + 1) // 2)
    ids[::2, 3] = EOS
    return ids


def test_rank_answers_is_first_token_preselection_then_full_likelihood(qa_model):
    inputs = tiny_inputs(qa_model.config)
    cands = candidates()
    out = qa_model.rank_answers(cands, **inputs, k=3)
    assert out.indices.shape == (3, 3) and out.probabilities.shape == (3, 3)
    torch.testing.assert_close(out.probabilities.sum(1), torch.ones(3), atol=1e-5, rtol=0)
    assert torch.all(out.probabilities[:, :-1] >= out.probabilities[:, 1:])
    # the k candidates are those with the highest first-token probability
    top = out.first_token_probabilities.topk(3, dim=1).indices
    assert all(set(a) == set(b) for a, b in zip(out.indices.tolist(), top.tolist()))
    # scores = log p(first) + log p(answer), from a plain forward pass over every candidate
    mask = (cands != 0).long()
    for row in range(3):
        single = {k: v[row : row + 1] for k, v in inputs.items()}
        keep = int(single["attention_mask"].sum())
        single["input_ids"], single["attention_mask"] = (
            single["input_ids"][:, :keep],
            single["attention_mask"][:, :keep],
        )
        chosen = out.indices[row]
        labels = cands[chosen].masked_fill(mask[chosen] == 0, -100)
        with torch.no_grad():
            nll = qa_model(**single, labels=labels, answers_per_question=[3]).loss_per_sequence
        scores = out.first_token_probabilities[row, chosen].log() - nll
        torch.testing.assert_close(out.probabilities[row], scores.softmax(0), atol=1e-5, rtol=1e-4)


def test_rank_answers_k_larger_than_candidates_and_validation(qa_model):
    inputs = tiny_inputs(qa_model.config)
    out = qa_model.rank_answers(candidates(4), **inputs, k=128)
    assert out.indices.shape == (3, 4)
    assert sorted(out.indices[0].tolist()) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="k"):
        qa_model.rank_answers(candidates(4), **inputs, k=0)
    with pytest.raises(ValueError, match="candidate_input_ids"):
        qa_model.rank_answers(torch.tensor([1, 2, 3]), **inputs)


def test_rank_answers_on_video(qa_model):
    inputs = tiny_inputs(qa_model.config, batch_size=1)
    inputs["pixel_values"] = torch.randn(1, 2, 3, 32, 32)
    assert qa_model.rank_answers(candidates(), **inputs, k=2).indices.shape == (1, 2)


def _count_memory_projections(model):
    """Rows passed through the decoder's cross-attention key projection, per call."""
    calls = []
    handles = [
        layer.crossattention.self.key.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
        for layer in model.text_decoder.bert.encoder.layer
    ]
    return calls, handles


def test_memory_keys_values_are_computed_once_per_image_for_all_beams_and_candidates(qa_model):
    inputs = tiny_inputs(qa_model.config)
    layers = len(qa_model.text_decoder.bert.encoder.layer)
    calls, handles = _count_memory_projections(qa_model)
    try:
        qa_model.generate(**inputs, num_beams=4, max_new_tokens=6)
        assert calls == [3] * layers  # one projection per layer, 3 image rows; none per beam or per step
        calls.clear()
        candidates = torch.randint(3, 100, (10, 4))
        candidates[:, 0] = BOS
        qa_model.rank_answers(candidates, k=6, **inputs)
        assert calls == [3] * layers  # shared by the first-token step and the 3 x 6 candidate sequences
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_shared_memory_cross_attention_equals_attention_to_expanded_memory(attn_implementation):
    from transformers.cache_utils import DynamicCache
    from transformers.models.bert.modeling_bert import BertCrossAttention

    from transformers_mplug.modeling_mplug import MPLUGSharedMemoryCache, MPLUGSharedMemoryCrossAttention

    torch.manual_seed(0)
    config = tiny_config(attn_implementation=attn_implementation).decoder_config()
    config._attn_implementation = attn_implementation
    shared = MPLUGSharedMemoryCrossAttention(config, layer_idx=0).eval()
    reference = BertCrossAttention(config, layer_idx=0).eval()
    reference.load_state_dict(shared.state_dict())
    images, group, length, tokens = 2, 3, 4, 7
    memory = torch.randn(images, tokens, config.hidden_size)
    queries = torch.randn(images * group, length, config.hidden_size)
    mask = torch.zeros(images, 1, 1, tokens)
    mask[1, ..., 5:] = torch.finfo(torch.float32).min  # padded memory of the second image
    expanded_mask = mask.repeat_interleave(group, 0)
    with torch.no_grad():
        expected, expected_weights = reference(
            queries, encoder_hidden_states=memory.repeat_interleave(group, 0), attention_mask=expanded_mask
        )
        cache = MPLUGSharedMemoryCache(DynamicCache(), DynamicCache())
        key, value = shared.project_memory(memory)
        cache.cross_attention_cache.update(key, value, 0)
        cache.is_updated[0] = True
        output, weights = shared(queries, attention_mask=expanded_mask, cache=cache)
    torch.testing.assert_close(output, expected, atol=1e-6, rtol=1e-5)
    if expected_weights is not None:
        torch.testing.assert_close(weights, expected_weights, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="cannot share"):
        shared(queries[:5], attention_mask=None, cache=cache)


def test_trainer_neither_rescales_the_loss_by_the_world_size_nor_passes_token_counts(tmp_path):
    # transformers multiplies the loss by the number of processes when a model accepts `num_items_in_batch`
    # (`model_accepts_loss_kwargs`); mPLUG's losses keep the original normalisation, so that must stay off
    from transformers import Trainer, TrainingArguments

    model = MPLUGForQuestionAnswering(tiny_config())
    trainer = Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True))
    assert trainer.model_accepts_loss_kwargs is False
    inputs = tiny_inputs(model.config)
    labels = torch.tensor([[BOS, 7, 8, EOS]] * 3)
    model.eval()
    with torch.no_grad():
        expected = model(**inputs, labels=labels).loss
        got = trainer.compute_loss(model, {**inputs, "labels": labels}, num_items_in_batch=torch.tensor(9))
    torch.testing.assert_close(got, expected)


class TestForQuestionAnsweringGeneration(MPLUGGenerationTesterMixin):
    model_class = MPLUGForQuestionAnswering
