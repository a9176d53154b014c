"""transformers conventions: the saved tokenizer carries the token contract; retrieval returns CLIP-style logits."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer, BertTokenizer

from transformers_mplug import MPLUGForRetrieval, MPLUGProcessor, MPLUGTokenizer

from .conftest import tiny_config, tiny_inputs

QUESTIONS = ["what is the color of the cat", "how many dogs"]


def test_the_saved_tokenizer_gives_the_token_contract_by_itself(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["tokenizer_class"] == "MPLUGTokenizer"
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert isinstance(tokenizer, MPLUGTokenizer)
    cls_id, sep_id, cat = (tokenizer.convert_tokens_to_ids(t) for t in ("[CLS]", "[SEP]", "cat"))
    assert tokenizer("a cat")["input_ids"] == [cls_id, tokenizer.convert_tokens_to_ids("a"), cat]  # no [SEP]
    assert tokenizer(text_target="cat")["input_ids"] == [cls_id, cat, sep_id]
    assert tokenizer("cat", "cat")["input_ids"] == [cls_id, cat, sep_id, cat, sep_id]
    assert set(tokenizer(QUESTIONS)) == {"input_ids", "attention_mask"}  # no token_type_ids
    # the same ids as the processor, inputs and targets (the processor relies on this tokenizer)
    batch = processor(text=QUESTIONS, text_target=["red", "two dogs"])
    direct = tokenizer(QUESTIONS, text_target=["red", "two dogs"], padding=True, return_tensors="pt")
    assert torch.equal(batch["input_ids"], direct["input_ids"])
    assert torch.equal(batch["labels"], direct["labels"].masked_fill(direct["labels"] == tokenizer.pad_token_id, -100))
    # truncation at model_max_length keeps [CLS] and the first pieces, as the processor does
    short = MPLUGTokenizer(vocab=tokenizer.get_vocab(), model_max_length=4)
    assert short("what is the color of the cat", truncation=True)["input_ids"] == tokenizer("what is the")["input_ids"]
    assert tokenizer.decode(tokenizer(text_target="two cat")["input_ids"], skip_special_tokens=True) == "two cat"


def test_a_folder_saved_with_a_bert_tokenizer_loads_with_the_contract(vocab_file, tmp_path):
    from transformers_mplug import MPLUGImageProcessor

    old = BertTokenizer(vocab=str(vocab_file), do_lower_case=True, model_max_length=40)
    assert old("cat")["input_ids"][-1] == old.sep_token_id  # BERT's own template ends with [SEP]
    MPLUGProcessor(MPLUGImageProcessor(size={"height": 32, "width": 32}), old).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = "BertTokenizer"  # as folders written before MPLUGTokenizer
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert type(AutoTokenizer.from_pretrained(tmp_path)) is BertTokenizer
    processor = MPLUGProcessor.from_pretrained(tmp_path)
    assert isinstance(processor.tokenizer, MPLUGTokenizer) and processor.tokenizer.model_max_length == 40
    assert processor.tokenizer.get_vocab() == old.get_vocab()
    cat = old.convert_tokens_to_ids("cat")
    assert processor(text="cat")["input_ids"].tolist() == [[old.cls_token_id, cat]]
    processor.save_pretrained(tmp_path / "resaved")
    assert isinstance(AutoTokenizer.from_pretrained(tmp_path / "resaved"), MPLUGTokenizer)


# ------------------------------------------------------------------------------------------------ retrieval
@pytest.fixture(scope="module")
def retrieval():
    torch.manual_seed(0)
    return MPLUGForRetrieval(tiny_config(projection_dim=16)).eval()


def test_retrieval_forward_returns_clip_style_logits(retrieval):
    inputs = tiny_inputs(retrieval.config, batch_size=3)
    images = inputs["pixel_values"][:2]
    with torch.no_grad():
        out = retrieval(pixel_values=images, input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        image_features = retrieval.get_image_features(pixel_values=images).pooler_output
        text_features = retrieval.get_text_features(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
        ).pooler_output
    assert out.loss is None and out.logits_per_image.shape == (2, 3)
    torch.testing.assert_close(out.logits_per_image, image_features @ text_features.t() / retrieval.temp)
    torch.testing.assert_close(out.logits_per_text, out.logits_per_image.t())
    as_tuple = retrieval(
        pixel_values=images, input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], return_dict=False
    )
    torch.testing.assert_close(as_tuple[0], out.logits_per_image)


def test_feature_getters_return_model_outputs_as_clip():
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    torch.manual_seed(0)
    retrieval = MPLUGForRetrieval(tiny_config(projection_dim=16, attn_implementation="eager")).eval()
    inputs = tiny_inputs(retrieval.config, batch_size=2)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():
        trunk = retrieval.mplug(**inputs, output_hidden_states=True, output_attentions=True)
        image = retrieval.get_image_features(
            pixel_values=inputs["pixel_values"], output_hidden_states=True, output_attentions=True
        )
        text = retrieval.get_text_features(ids, mask, output_hidden_states=True, output_attentions=True)
        raw = retrieval.get_image_features(pixel_values=inputs["pixel_values"], normalize=False)
        as_tuple = retrieval.get_text_features(ids, mask, return_dict=False)
    assert isinstance(image, BaseModelOutputWithPooling) and isinstance(text, BaseModelOutputWithPooling)
    torch.testing.assert_close(image.last_hidden_state, trunk.image_embeds)
    torch.testing.assert_close(text.last_hidden_state, trunk.text_embeds)
    torch.testing.assert_close(image.pooler_output, torch.nn.functional.normalize(raw.pooler_output, dim=-1))
    torch.testing.assert_close(raw.pooler_output, retrieval.vision_proj(trunk.image_embeds[:, 0]))
    torch.testing.assert_close(text.pooler_output.norm(dim=-1), torch.ones(2))
    for ours, theirs in (
        (image.hidden_states, trunk.vision_hidden_states),
        (text.hidden_states, trunk.text_hidden_states),
    ):
        assert len(ours) == len(theirs)
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b)
    assert len(image.attentions) == retrieval.config.vision_config.num_hidden_layers
    assert len(text.attentions) == retrieval.config.text_config.num_hidden_layers
    assert raw.hidden_states is None and raw.attentions is None
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[1], text.pooler_output)
    with pytest.raises(ValueError, match="pass `pixel_values`"):
        retrieval.get_image_features(image_embeds=trunk.image_embeds, output_hidden_states=True)
    with pytest.raises(ValueError, match="not both"):
        retrieval.get_text_features(ids, text_embeds=trunk.text_embeds)


def test_retrieval_forward_itm_head_scores_pairs(retrieval):
    inputs = tiny_inputs(retrieval.config, batch_size=3)
    with torch.no_grad():
        out = retrieval(**inputs, use_itm_head=True)
        expected = retrieval.match_pairs(**inputs)
    torch.testing.assert_close(out.itm_logits, expected)
    with pytest.raises(ValueError, match="scores pairs"):
        retrieval(pixel_values=inputs["pixel_values"][:2], input_ids=inputs["input_ids"], use_itm_head=True)


def test_retrieval_forward_trains_in_training_mode_or_when_asked(retrieval):
    inputs = tiny_inputs(retrieval.config, batch_size=3)
    with torch.no_grad():
        asked = retrieval(**inputs, return_loss=True)
        with_idx = retrieval(**inputs, idx=torch.arange(3))
    assert asked.loss is not None and asked.logits_per_image is None and with_idx.loss is not None
    retrieval.train()
    try:
        with torch.no_grad():
            assert retrieval(**inputs).loss is not None
    finally:
        retrieval.eval()
    with pytest.raises(ValueError, match="no training arguments"):
        retrieval(**inputs, idx=torch.arange(3), return_loss=False)
    with pytest.raises(ValueError, match="inference option"):
        retrieval(**inputs, return_loss=True, use_itm_head=True)


# ------------------------------------------------------------------------------------------------ old folders
BEFORE_CONVENTIONS = (
    "d2d3d538dacde6a5a0136b3696c44d34cb04ab8c"  # the last commit before MPLUGTokenizer and CLIP-style retrieval outputs
)


def test_folders_saved_before_the_conventions_change_load(tmp_path, vocab_file):
    """A VQA and a retrieval folder written by the package at BEFORE_CONVENTIONS load and give the same outputs."""
    import subprocess
    import sys

    from .conftest import REPO_ROOT

    old_tree = tmp_path / "old"
    archive = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "archive", BEFORE_CONVENTIONS, "src", "tests/conftest.py", "tests/__init__.py"],
        capture_output=True,
    )
    if archive.returncode != 0:
        pytest.skip(f"commit {BEFORE_CONVENTIONS} is not in this clone's history (a shallow clone?)")
    old_tree.mkdir()
    subprocess.run(["tar", "-x", "-C", str(old_tree)], input=archive.stdout, check=True)
    script = f"""
import sys, torch
sys.path.insert(0, {str(old_tree / "src")!r}); sys.path.insert(0, {str(old_tree)!r})
import transformers_mplug
assert transformers_mplug.__file__.startswith({str(old_tree)!r})
from transformers_mplug import MPLUGForQuestionAnswering, MPLUGForRetrieval, MPLUGProcessor
from tests.conftest import tiny_config
processor = MPLUGProcessor.from_vocab_file({str(vocab_file)!r}, image_size=32, model_max_length=40)
torch.manual_seed(0)
inputs = processor(images=[torch.rand(3, 32, 32)] * 2, text=["what is the cat", "how many dogs"])
for name, head in (("qa", MPLUGForQuestionAnswering), ("retrieval", MPLUGForRetrieval)):
    model = head(tiny_config(projection_dim=16)).eval()
    model.save_pretrained({str(tmp_path)!r} + "/" + name)
    processor.save_pretrained({str(tmp_path)!r} + "/" + name)
    with torch.no_grad():
        if name == "qa":
            expected = model.generate(**inputs, num_beams=2, max_new_tokens=4)
        else:
            expected = model.get_image_features(pixel_values=inputs["pixel_values"]) @ model.get_text_features(
                input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).t()
    torch.save({{"inputs": dict(inputs), "expected": expected}}, {str(tmp_path)!r} + f"/{{name}}.pt")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    from transformers_mplug import MPLUGForQuestionAnswering

    qa = MPLUGForQuestionAnswering.from_pretrained(tmp_path / "qa").eval()
    saved = torch.load(tmp_path / "qa.pt", weights_only=True)
    processor = MPLUGProcessor.from_pretrained(tmp_path / "qa")
    assert torch.equal(processor(text=["what is the cat", "how many dogs"])["input_ids"], saved["inputs"]["input_ids"])
    with torch.no_grad():
        assert torch.equal(qa.generate(**saved["inputs"], num_beams=2, max_new_tokens=4), saved["expected"])
    retrieval = MPLUGForRetrieval.from_pretrained(tmp_path / "retrieval").eval()
    saved = torch.load(tmp_path / "retrieval.pt", weights_only=True)
    with torch.no_grad():
        logits = retrieval(**saved["inputs"]).logits_per_image
    torch.testing.assert_close(logits * retrieval.temp, saved["expected"])


# ------------------------------------------------------------------------------------------------ recorded outputs
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_trunk_records_every_stage(attn_implementation):
    from transformers_mplug import MPLUGModel

    torch.manual_seed(0)
    model = MPLUGModel(tiny_config(attn_implementation=attn_implementation)).eval()
    inputs = tiny_inputs(model.config)
    with torch.no_grad():
        plain = model(**inputs)
        out = model(**inputs, output_hidden_states=True, output_attentions=True)
        again = model(**inputs, output_hidden_states=True)  # hooks are installed once
    assert plain.vision_hidden_states is None and plain.fusion_attentions is None
    torch.testing.assert_close(out.last_hidden_state, plain.last_hidden_state, atol=0, rtol=0)
    config = model.config
    assert (
        len(out.vision_hidden_states) == config.vision_config.num_hidden_layers + 1 == len(again.vision_hidden_states)
    )
    post = model.vision_model.post_layernorm(out.vision_hidden_states[-1])
    torch.testing.assert_close(post, out.vision_last_hidden_state)
    assert len(out.text_hidden_states) == config.text_config.num_hidden_layers + 1
    torch.testing.assert_close(out.text_hidden_states[-1], out.text_embeds)
    layers = len(config.cross_modal_layer_types)
    assert len(out.fusion_text_hidden_states) == len(out.fusion_image_hidden_states) == layers
    torch.testing.assert_close(out.fusion_text_hidden_states[-1], out.fused_text_embeds)
    torch.testing.assert_close(out.fusion_image_hidden_states[-1], out.fused_image_embeds)
    if attn_implementation == "eager":
        batch, heads = inputs["input_ids"].shape[0], config.text_config.num_attention_heads
        tokens, length = out.image_embeds.shape[1], inputs["input_ids"].shape[1]
        assert [tuple(a.shape) for a in out.fusion_attentions] == [
            (batch, heads, length, length)
            if kind == "co_attention"
            else (batch, heads, tokens + length, tokens + length)
            for kind in config.cross_modal_layer_types
        ]
        co_attention = config.cross_modal_layer_types.count("co_attention")
        assert [tuple(a.shape) for a in out.fusion_cross_attentions] == [(batch, heads, length, tokens)] * co_attention
        assert len(out.vision_attentions) == config.vision_config.num_hidden_layers
        assert len(out.text_attentions) == config.text_config.num_hidden_layers
        torch.testing.assert_close(out.fusion_cross_attentions[0].sum(-1), torch.ones(batch, heads, length))
    else:  # SDPA computes no weights: the tuples are empty
        assert out.vision_attentions == () and out.fusion_attentions == () and out.text_attentions == ()
    as_tuple = model(**inputs, output_hidden_states=True, return_dict=False)
    assert len(as_tuple) == len(model(**inputs, return_dict=False)) + 4


def _labels(input_ids):
    return input_ids.masked_fill(input_ids == 0, -100)


def test_every_head_accepts_output_hidden_states_and_attentions():
    from transformers_mplug import (
        MPLUGForCaptioning,
        MPLUGForGrounding,
        MPLUGForPreTraining,
        MPLUGForQuestionAnswering,
        MPLUGForVisualEntailment,
        MPLUGForVisualReasoning,
    )

    config = tiny_config(
        attn_implementation="eager",
        projection_dim=16,
        grounding_prefix_token_id=20,
        coordinate_token_start_id=21,
        num_coordinate_bins=33,
        queue_size=4,
    )
    inputs = tiny_inputs(config)
    pixel_values, ids, mask = inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"]
    flags = dict(output_hidden_states=True, output_attentions=True)
    torch.manual_seed(0)
    cases = {
        MPLUGForQuestionAnswering: dict(inputs, labels=_labels(ids)),
        MPLUGForCaptioning: dict(pixel_values=pixel_values, labels=_labels(ids)),
        MPLUGForVisualEntailment: dict(inputs, labels=torch.tensor([0, 1, 1])),
        MPLUGForVisualReasoning: dict(
            pixel_values=torch.stack([pixel_values, pixel_values.flip(0)], 1), input_ids=ids, attention_mask=mask
        ),
        MPLUGForGrounding: dict(inputs, boxes=torch.full((3, 4), 0.5)),
        MPLUGForRetrieval: dict(inputs),
    }
    for head, head_inputs in cases.items():
        model = head(config).eval()
        with torch.no_grad():
            plain = model(**head_inputs)
            out = model(**head_inputs, **flags)
        for name, value in plain.items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(out[name], value, atol=0, rtol=0, msg=f"{head.__name__}.{name}")
        assert len(out.vision_hidden_states) == config.vision_config.num_hidden_layers + 1, head.__name__
        assert len(out.vision_attentions) == config.vision_config.num_hidden_layers, head.__name__
        if head is not MPLUGForCaptioning:
            assert len(out.text_hidden_states) == config.text_config.num_hidden_layers + 1, head.__name__
        if head in (MPLUGForQuestionAnswering, MPLUGForVisualEntailment, MPLUGForGrounding):
            assert len(out.fusion_text_hidden_states) == len(config.cross_modal_layer_types), head.__name__
        if head in (MPLUGForQuestionAnswering, MPLUGForCaptioning, MPLUGForGrounding):
            assert len(out.decoder_hidden_states) == config.num_decoder_layers + 1, head.__name__
            assert len(out.decoder_cross_attentions) == config.num_decoder_layers, head.__name__
            memory = out.decoder_cross_attentions[0].shape[-1]
            assert memory == (5 if head is MPLUGForCaptioning else 5 + ids.shape[1]), head.__name__
    retrieval = MPLUGForRetrieval(config).eval()
    with torch.no_grad():
        itm = retrieval(**inputs, use_itm_head=True, **flags)
    assert len(itm.fusion_text_hidden_states) == len(config.cross_modal_layer_types)
    with pytest.raises(ValueError, match="training step runs several fused passes"):
        retrieval(**inputs, return_loss=True, output_hidden_states=True)
    with pytest.raises(ValueError, match="pass `boxes`"):
        MPLUGForGrounding(config).eval()(**inputs, output_attentions=True)
    with pytest.raises(ValueError, match="does not record"):
        MPLUGForPreTraining(config)(**inputs, output_hidden_states=True)
    with pytest.raises(TypeError, match="`output_hidden_states` must be True or False"):
        retrieval(**inputs, output_hidden_states="yes")


# ------------------------------------------------------------------------------------------------ resizing
def test_resize_token_embeddings_covers_every_embedding_that_reads_the_ids():
    from transformers_mplug import MPLUGForPreTraining, MPLUGForQuestionAnswering

    torch.manual_seed(0)
    for head in (MPLUGForQuestionAnswering, MPLUGForPreTraining, MPLUGForRetrieval):
        model = head(tiny_config(projection_dim=16, queue_size=4)).eval()
        before = {n: p.clone() for n, p in model.state_dict().items() if "word_embeddings" in n}
        model.resize_token_embeddings(130, mean_resizing=False)
        assert model.config.vocab_size == model.config.text_config.vocab_size == 130
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Embedding) and name.endswith("word_embeddings"):
                assert module.num_embeddings == 130, (head.__name__, name)
                torch.testing.assert_close(module.weight[:128], before[f"{name}.weight"], atol=0, rtol=0)
            if hasattr(module, "config") and hasattr(module.config, "vocab_size"):
                assert module.config.vocab_size == 130, (head.__name__, name)
        inputs = tiny_inputs(model.config)
        inputs["input_ids"][0, 1] = 129  # a new token in the text
        with torch.no_grad():
            if head is MPLUGForQuestionAnswering:
                decoder = model.text_decoder
                assert decoder.cls.predictions.decoder.weight is decoder.bert.embeddings.word_embeddings.weight
                assert decoder.cls.predictions.bias.shape == (130,)
                labels = torch.tensor([[101, 129, 102]] * 3)
                assert model(**inputs, labels=labels).logits.shape[-1] == 130
                assert model.generate(**inputs, num_beams=2, max_new_tokens=2).shape[0] == 3
            elif head is MPLUGForRetrieval:
                assert model(**inputs).logits_per_image.shape == (3, 3)
            else:
                mlm = model.mlm_head.predictions
                assert mlm.decoder.weight is model.mplug.text_model.embeddings.word_embeddings.weight
                assert mlm.bias.shape == (130,)


@pytest.mark.parametrize("backend", ["flex_attention", "flash_attention_2"])
def test_only_the_tested_attention_backends_are_declared(backend):
    from transformers_mplug import MPLUGForQuestionAnswering

    assert MPLUGForQuestionAnswering._supports_sdpa
    with pytest.raises((ValueError, ImportError), match="(?i)flex|flash"):
        MPLUGForQuestionAnswering(tiny_config(attn_implementation=backend))


def test_forward_kwargs_follow_transformers_kwargs():
    from transformers_mplug import MPLUGForQuestionAnswering, MPLUGModel

    torch.manual_seed(0)
    model = MPLUGForQuestionAnswering(tiny_config()).eval()
    inputs = tiny_inputs(model.config)
    labels = torch.tensor([[101, 110, 102]] * 3)
    with torch.no_grad():
        as_dict = model(**inputs, labels=labels)
        as_tuple = model(**inputs, labels=labels, return_dict=False)  # transformers' can_return_tuple
        model.config.return_dict = False
        try:
            from_config = model(**inputs, labels=labels)
        finally:
            model.config.return_dict = True
        unused_none = model(**inputs, labels=labels, position_ids=None)  # TransformersKwargs left unset are fine
    assert isinstance(as_tuple, tuple) and isinstance(from_config, tuple)
    torch.testing.assert_close(as_tuple[0], as_dict.loss)
    torch.testing.assert_close(as_tuple[1], as_dict.logits)
    torch.testing.assert_close(unused_none.logits, as_dict.logits)
    with pytest.raises(
        TypeError,
        match=r"MPLUGForQuestionAnswering.forward\(\) got unexpected keyword argument\(s\) \['position_ids'\]",
    ):
        model(**inputs, labels=labels, position_ids=torch.arange(7)[None])
    with pytest.raises(TypeError, match="token_type_ids"):  # the trunk takes no token types
        MPLUGModel(tiny_config())(**inputs, token_type_ids=torch.zeros_like(inputs["input_ids"]))


def test_config_vocab_size_is_the_text_vocabulary_and_settable():
    config = tiny_config()
    config.vocab_size = 140  # as transformers' resizing code writes it
    assert config.text_config.vocab_size == 140 == config.vocab_size
    with pytest.raises(ValueError, match="`vocab_size` must be an int >= 1"):
        config.vocab_size = 0


def test_the_modeling_file_uses_no_distributed_api():
    """ZeRO-3 internals and cross-rank gathering live in training.py (the modeling file calls its functions)."""
    import inspect

    from transformers_mplug import modeling_mplug, training

    source = inspect.getsource(modeling_mplug)
    for name in ("torch.distributed", "ds_tensor", "ds_numel", "ds_shape", "deepspeed"):
        assert name not in source, name
    assert "torch.distributed" in inspect.getsource(training.gather_across_ranks)


def test_a_bert_tokenizer_with_added_tokens_keeps_its_ids_in_the_processor(vocab_file):
    from transformers_mplug import MPLUGImageProcessor

    old = BertTokenizer(vocab=str(vocab_file), do_lower_case=True)
    old.add_tokens(["<obj>"])
    old.add_special_tokens({"additional_special_tokens": ["[LOC]"]})
    processor = MPLUGProcessor(MPLUGImageProcessor(size={"height": 32, "width": 32}), old)
    text = "a <obj> [LOC] cat"
    assert (
        processor.tokenizer(text)["input_ids"] == [old.cls_token_id] + old(text, add_special_tokens=False)["input_ids"]
    )
    assert processor.tokenizer.get_vocab() == old.get_vocab()
    assert "[LOC]" in processor.tokenizer.all_special_tokens


# ------------------------------------------------------------------------------------------------ step decoding
@pytest.mark.parametrize("head", ["qa", "caption"])
def test_a_step_by_step_loop_with_use_cache_drives_the_decoder_heads(head):
    from transformers_mplug import MPLUGForCaptioning, MPLUGForQuestionAnswering, MPLUGModelOutput

    torch.manual_seed(0)
    cls = MPLUGForQuestionAnswering if head == "qa" else MPLUGForCaptioning
    model = cls(tiny_config()).eval()
    inputs = tiny_inputs(model.config, batch_size=2)
    steps, bos = 4, model.config.bos_token_id
    tokens = torch.full((2, 1), bos)
    with torch.no_grad():
        expected = model.generate(
            **(inputs if head == "qa" else {"pixel_values": inputs["pixel_values"]}),
            num_beams=1,
            max_new_tokens=steps,
            min_new_tokens=steps,
            decoding_mode="transformers",
        )
        if head == "qa":
            first = model(**inputs, decoder_input_ids=tokens, use_cache=True)
            encoded = MPLUGModelOutput(
                last_hidden_state=first.memory, memory_attention_mask=first.memory_attention_mask
            )

            def step(new, past):
                return model(encoder_outputs=encoded, decoder_input_ids=new, cache=past)

        else:
            first = model(pixel_values=inputs["pixel_values"], input_ids=tokens, use_cache=True)

            def step(new, past):
                return model(image_embeds=first.memory, input_ids=new, cache=past)

        out, logits = first, [first.logits[:, -1]]
        for _ in range(steps - 1):
            tokens = torch.cat([tokens, out.logits[:, -1].argmax(-1, keepdim=True)], dim=1)
            out = step(tokens[:, -1:], out.cache)
            logits.append(out.logits[:, -1])
        tokens = torch.cat([tokens, out.logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        teacher = (
            model(**inputs, decoder_input_ids=tokens[:, :-1])
            if head == "qa"
            else model(pixel_values=inputs["pixel_values"], input_ids=tokens[:, :-1])
        )
    assert out.cache.get_seq_length() == steps
    torch.testing.assert_close(torch.stack(logits, 1), teacher.logits, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(tokens, expected)
    assert (
        model(
            **inputs if head == "qa" else {"pixel_values": inputs["pixel_values"]},
            **({"decoder_input_ids": tokens} if head == "qa" else {"input_ids": tokens}),
        ).past_key_values
        is None
    )
    assert out.past_key_values is out.cache  # the name before transformers 5.24
    new = (
        {"encoder_outputs": encoded, "decoder_input_ids": tokens[:, -1:]}
        if head == "qa"
        else {"image_embeds": first.memory, "input_ids": tokens[:, -1:]}
    )
    with pytest.raises(ValueError, match="use_cache=False"):
        model(**new, cache=out.cache, use_cache=False)
    with pytest.raises(ValueError, match="shape"):  # a mask over the new tokens only
        model(
            **new,
            cache=out.cache,
            **{("decoder_attention_mask" if head == "qa" else "attention_mask"): torch.ones(2, 1)},
        )


def test_the_decoder_config_is_the_configs_own_sub_config(tmp_path):
    from transformers_mplug import MPLUGConfig, MPLUGForCaptioning, MPLUGForGrounding, MPLUGForQuestionAnswering

    for cls in (MPLUGForQuestionAnswering, MPLUGForCaptioning, MPLUGForGrounding):
        grounding = dict(grounding_prefix_token_id=20, coordinate_token_start_id=21, num_coordinate_bins=33)
        model = cls(tiny_config(num_decoder_layers=2, **(grounding if cls is MPLUGForGrounding else {})))
        assert model.text_decoder.config is model.config.text_decoder_config is model.config.decoder_config()
        assert model.config.text_decoder_config.num_hidden_layers == model.config.num_decoder_layers == 2
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["num_decoder_layers"] == saved["text_decoder_config"]["num_hidden_layers"] == 2
    loaded = MPLUGForGrounding.from_pretrained(tmp_path)
    assert loaded.text_decoder.config is loaded.config.text_decoder_config
    config = tiny_config()
    config.num_decoder_layers = 3  # follows into the decoder's sub-config
    assert config.text_decoder_config.num_hidden_layers == 3
    config.vocab_size = 130
    assert config.text_decoder_config.vocab_size == 130
    with pytest.raises(ValueError, match="disagrees with `num_decoder_layers`"):
        MPLUGConfig(num_decoder_layers=2, text_decoder_config={"num_hidden_layers": 3})
    with pytest.raises(ValueError, match="`text_decoder_config.hidden_size`"):
        MPLUGConfig(text_decoder_config={"hidden_size": 64, "num_hidden_layers": 12})


def test_the_processor_takes_transformers_processing_kwargs(processor):
    from PIL import Image

    from transformers_mplug.processing_mplug import MPLUGProcessorKwargs

    assert MPLUGProcessorKwargs._defaults["text_kwargs"]["padding"] == "longest"
    image = Image.new("RGB", (40, 30))
    texts = ["what is the color of the cat", "red"]
    flat = processor(images=[image, image], text=texts, padding="max_length", max_length=12)
    nested = processor(
        images=[image, image], text=texts, text_kwargs={"padding": "max_length", "max_length": 12}, images_kwargs={}
    )
    assert flat["input_ids"].shape == (2, 12) and torch.equal(flat["input_ids"], nested["input_ids"])
    torch.testing.assert_close(flat["pixel_values"], nested["pixel_values"])
    targets = processor(text_kwargs={"text_target": ["red", "two cats"]})
    assert torch.equal(targets["labels"], processor(text_target=["red", "two cats"])["labels"])
    as_lists = processor(text="red", common_kwargs={"return_tensors": None})
    assert isinstance(as_lists["input_ids"], list)
    with pytest.raises(TypeError, match="does not implement the text argument"):
        processor(text="red", stride=2)
    with pytest.raises(TypeError, match="does not implement the text argument"):
        processor(text="red", text_kwargs={"pad_to_multiple_of": 8})
    with pytest.raises(TypeError, match="unexpected argument"):
        processor(images=image, do_resize=False)  # the image processor has no such option
    with pytest.raises(TypeError, match="unexpected argument"):
        processor(text="red", colour="blue")
    with pytest.raises(ValueError, match="passed twice"):
        processor(text="red", padding="longest", text_kwargs={"padding": "max_length"})
