"""Bad input gives a clear error or the right result, never a silently wrong one (images, ids, masks, decoding)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from transformers_mplug import MPLUGForCaptioning, MPLUGForQuestionAnswering, MPLUGForRetrieval, MPLUGImageProcessor

from .conftest import tiny_config, tiny_inputs

EOS = 102 % 128


@pytest.fixture(scope="module")
def qa_model():
    torch.manual_seed(0)
    model = MPLUGForQuestionAnswering(tiny_config()).eval()
    with torch.no_grad():
        model.text_decoder.cls.predictions.bias[EOS] += 2.5
    return model


# ------------------------------------------------------------------------------------------------ images
@pytest.fixture(scope="module")
def image_processor():
    return MPLUGImageProcessor(size={"height": 32, "width": 32})


def _pixels(processor, image):
    return processor(image, return_tensors="pt")["pixel_values"]


def test_16_bit_images_equal_their_8_bit_version(image_processor):
    rgb8 = np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    rgb16 = rgb8.astype(np.uint16) * 257  # the same intensities on 16 bits
    expected = _pixels(image_processor, rgb8)
    torch.testing.assert_close(_pixels(image_processor, rgb16), expected, atol=1 / 255, rtol=0)
    grey8 = rgb8[..., 0]
    grey16 = Image.fromarray(grey8.astype(np.uint16) * 257)  # PIL "I;16"
    assert grey16.mode.startswith("I")
    torch.testing.assert_close(_pixels(image_processor, grey16), _pixels(image_processor, grey8), atol=1 / 255, rtol=0)
    as_int32 = Image.fromarray(grey8.astype(np.int32) * 257)  # PIL "I" (how 16-bit PNGs load)
    torch.testing.assert_close(
        _pixels(image_processor, as_int32), _pixels(image_processor, grey8), atol=1 / 255, rtol=0
    )


def test_float_images_are_read_in_0_1(image_processor):
    grey8 = np.random.default_rng(1).integers(0, 256, (16, 16), dtype=np.uint8)
    as_float = Image.fromarray(grey8.astype(np.float32) / 255.0)  # PIL "F"
    assert as_float.mode == "F"
    torch.testing.assert_close(_pixels(image_processor, as_float), _pixels(image_processor, grey8), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        image_processor(Image.fromarray(grey8.astype(np.float32)))  # 0..255 floats: not silently black/white


@pytest.mark.parametrize(
    ("image", "error", "match"),
    [
        (np.ones((8, 8), dtype=bool), TypeError, "bool"),
        (np.full((8, 8, 3), 300, dtype=np.int64), ValueError, r"\[0, 255\]"),
        (np.full((8, 8, 3), -1, dtype=np.int16), ValueError, r"\[0, 255\]"),
        (np.full((8, 8, 3), np.nan, dtype=np.float32), ValueError, "NaN"),
    ],
)
def test_images_that_cannot_be_read_are_refused(image_processor, image, error, match):
    with pytest.raises(error, match=match):
        image_processor(image)


def test_non_finite_pixel_values_raise(qa_model):
    inputs = tiny_inputs(qa_model.config)
    inputs["pixel_values"][0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="pixel_values.*NaN"):
        qa_model.generate(**inputs)
    inputs["pixel_values"][0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="pixel_values.*NaN or inf"):
        qa_model(**inputs, labels=torch.tensor([[101 % 128, 5, EOS]] * 3))


# ------------------------------------------------------------------------------------------------ ids and masks
def test_ids_outside_the_vocabulary_raise_naming_the_argument(qa_model):
    inputs = tiny_inputs(qa_model.config)
    vocab = qa_model.config.vocab_size
    bad = dict(inputs, input_ids=inputs["input_ids"].clone())
    bad["input_ids"][0, 1] = vocab
    with pytest.raises(ValueError, match=rf"`input_ids` holds ids outside \[0, {vocab}\)"):
        qa_model.generate(**bad)
    labels = torch.tensor([[101 % 128, vocab + 5, EOS], [101 % 128, 5, -100], [101 % 128, 6, EOS]])
    with pytest.raises(ValueError, match="`labels`"):
        qa_model(**inputs, labels=labels)
    with pytest.raises(ValueError, match="`candidate_input_ids`"):
        qa_model.rank_answers(torch.tensor([[101 % 128, -3, EOS]]), **inputs)
    with pytest.raises(ValueError, match="at least one candidate"):
        qa_model.rank_answers(torch.zeros(0, 3, dtype=torch.long), **inputs)
    with pytest.raises(TypeError, match="integer token ids"):
        qa_model.generate(**dict(inputs, input_ids=inputs["input_ids"].float()))


def test_padded_ids_without_a_mask_use_the_padding(qa_model):
    inputs = tiny_inputs(qa_model.config, padded=True)
    assert (inputs["input_ids"] == qa_model.config.pad_token_id).any()
    with_mask = qa_model.generate(**inputs, return_dict_in_generate=True, output_scores=True)
    del inputs["attention_mask"]
    without = qa_model.generate(**inputs, return_dict_in_generate=True, output_scores=True)
    assert torch.equal(with_mask.sequences, without.sequences)
    torch.testing.assert_close(with_mask.sequences_scores, without.sequences_scores)


def test_text_features_refuse_a_mask_of_the_wrong_shape():
    model = MPLUGForRetrieval(tiny_config()).eval()
    inputs = tiny_inputs(model.config)
    with pytest.raises(ValueError, match="`attention_mask` has shape"):
        model.get_text_features(inputs["input_ids"], inputs["attention_mask"][:, :-1])
    # without a mask the padding is masked: the same features as with the processor's mask
    torch.testing.assert_close(
        model.get_text_features(inputs["input_ids"]).pooler_output,
        model.get_text_features(inputs["input_ids"], inputs["attention_mask"]).pooler_output,
    )


# ------------------------------------------------------------------------------------------------ decoding
def test_one_pad_id_for_every_decoding(qa_model):
    inputs = tiny_inputs(qa_model.config)
    pad = qa_model.config.pad_token_id
    for kwargs in (
        dict(decoding_mode="transformers", num_beams=4),
        dict(decoding_mode="transformers", num_beams=1),
        dict(num_beams=4),
        dict(num_beams=1),
    ):
        out = qa_model.generate(**inputs, max_new_tokens=8, **kwargs)
        for row in out[:, 1:].tolist():
            if EOS in row and kwargs.get("decoding_mode") == "transformers":
                assert all(t == pad for t in row[row.index(EOS) + 1 :]), kwargs
    # the original mode pads after each returned hypothesis's own length
    original = qa_model.generate(**inputs, max_new_tokens=8, return_dict_in_generate=True)
    for row, length in zip(original.sequences.tolist(), original.sequence_lengths.tolist()):
        assert all(t == pad for t in row[length:])


def test_captioner_validates_ids_too():
    model = MPLUGForCaptioning(tiny_config()).eval()
    with pytest.raises(ValueError, match="`labels`"):
        model(pixel_values=torch.randn(1, 3, 32, 32), labels=torch.tensor([[101 % 128, 999, EOS]]))


# ------------------------------------------------------------------------------------------------ long texts
def test_long_questions_are_truncated_at_the_text_encoders_positions(qa_model, vocab_file, tmp_path):
    from transformers import pipeline

    from transformers_mplug import MPLUGProcessor

    positions = qa_model.config.text_config.max_position_embeddings
    processor = MPLUGProcessor.from_vocab_file(vocab_file, image_size=32, model_max_length=positions)
    long_question = " ".join(["what is the color of a cat"] * 10)  # 70 words > 40 positions
    encoded = processor(text=long_question)
    assert encoded["input_ids"].shape[1] == positions
    kept = processor.tokenizer.decode(encoded["input_ids"][0, 1:])
    truncated = processor(text=kept)
    assert torch.equal(encoded["input_ids"], truncated["input_ids"])
    assert processor(text=long_question, truncation=False)["input_ids"].shape[1] == 71
    assert processor(text=long_question, truncation=True, max_length=8)["input_ids"].shape[1] == 8
    with pytest.raises(ValueError, match="input_ids.*71 tokens.*40 positions"):
        qa_model.generate(pixel_values=torch.randn(1, 3, 32, 32), **processor(text=long_question, truncation=False))
    # the pipeline truncates the same way (and honours truncation/max_length)
    qa_model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    vqa = pipeline("visual-question-answering", model=str(tmp_path))
    image = Image.new("RGB", (32, 32), (200, 30, 30))
    assert vqa(image, long_question) == vqa(image, kept)
    short = processor.tokenizer.decode(processor(text=long_question, truncation=True, max_length=8)["input_ids"][0, 1:])
    assert vqa(image, long_question, truncation=True, max_length=8) == vqa(image, short)


# ------------------------------------------------------------------------------------------------ folders
def test_processor_folder_without_tokenizer_files_is_refused(processor, tmp_path):
    from transformers_mplug import MPLUGProcessor

    processor.save_pretrained(tmp_path)
    assert MPLUGProcessor.from_pretrained(tmp_path).tokenizer.convert_tokens_to_ids("cat") != 100
    for name in ("tokenizer.json", "vocab.txt"):
        (tmp_path / name).unlink(missing_ok=True)
    with pytest.raises(ValueError, match="no tokenizer file"):
        MPLUGProcessor.from_pretrained(tmp_path)


@pytest.mark.parametrize("missing", ["[CLS]", "[SEP]", "[PAD]", "[MASK]"])
def test_a_vocabulary_without_the_special_tokens_is_refused(tmp_path, missing):
    from transformers_mplug import MPLUGProcessor

    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "cat", "dog"]
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(t for t in tokens if t != missing) + "\n", encoding="utf-8")
    with pytest.raises((ValueError, TypeError), match=r"\[CLS\]"):
        MPLUGProcessor.from_vocab_file(path, image_size=32)


def test_empty_galleries_raise():
    model = MPLUGForRetrieval(tiny_config()).eval()
    inputs = tiny_inputs(model.config)
    with pytest.raises(ValueError, match="at least one text"):
        model.retrieve(pixel_values=inputs["pixel_values"], input_ids=inputs["input_ids"][:0], k=2)
    with pytest.raises(ValueError, match="image gallery is empty"):
        model.retrieve(pixel_values=inputs["pixel_values"][:0], input_ids=inputs["input_ids"], k=2)


def test_vqa_pipeline_refuses_a_folder_without_tokenizer_files(qa_model, processor, tmp_path):
    from transformers import pipeline

    qa_model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    image = Image.new("RGB", (32, 32), (200, 30, 30))
    assert isinstance(
        pipeline("visual-question-answering", model=str(tmp_path))(image, "what is red")[0]["answer"], str
    )
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        (tmp_path / name).unlink(missing_ok=True)
    vqa = pipeline("visual-question-answering", model=str(tmp_path))  # transformers builds a stand-in tokenizer
    with pytest.raises(ValueError, match=rf"{tmp_path}.*only its 5 special tokens.*tokenizer.json. or .vocab.txt"):
        vqa(image, "what is red")


def test_pipeline_refuses_a_tokenizer_larger_than_the_models_vocabulary(qa_model, tmp_path):
    from transformers import pipeline

    from transformers_mplug import MPLUGProcessor

    words = [f"word{i}" for i in range(40)]
    path = tmp_path / "vocab.txt"
    path.write_text(
        "\n".join(["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words)
    )
    big = MPLUGProcessor.from_vocab_file(path, image_size=32)
    vqa = pipeline(
        "visual-question-answering", model=qa_model, tokenizer=big.tokenizer, image_processor=big.image_processor
    )
    with pytest.raises(ValueError, match="144 tokens, more than the model's vocabulary \\(128\\)"):
        vqa(Image.new("RGB", (32, 32)), "word1")


def test_decoding_ids_outside_the_tokenizer_raises(processor):
    assert processor.decode([101, 103 + 7, 102]) == "cat"
    with pytest.raises(ValueError, match=r"`token_ids` holds id\(s\) \[128, 500\] outside the tokenizer's 128 tokens"):
        processor.batch_decode(torch.tensor([[101, 128, 500]]))


def test_model_folders_without_config_json_are_refused(tmp_path):
    from transformers_mplug import MPLUGModel

    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no `config.json` \\(it is empty\\)"):
        MPLUGForQuestionAnswering.from_pretrained(tmp_path / "empty")
    with pytest.raises(ValueError, match="is not a folder"):
        MPLUGModel.from_pretrained(str(tmp_path / "absent"))
    model = MPLUGModel(tiny_config())
    model.save_pretrained(tmp_path / "model")
    (tmp_path / "model" / "config.json").unlink()
    with pytest.raises(ValueError, match=r"has no `config.json` \(it holds \['model.safetensors'\]\).*pass `config=`"):
        MPLUGModel.from_pretrained(tmp_path / "model")
    loaded = MPLUGModel.from_pretrained(tmp_path / "model", config=model.config)  # config given: fine
    assert torch.equal(
        loaded.text_model.embeddings.word_embeddings.weight, model.text_model.embeddings.word_embeddings.weight
    )


def _drop_weights(folder, prefix: str) -> list[str]:
    from safetensors.torch import load_file, save_file

    weights = load_file(folder / "model.safetensors")
    dropped = [k for k in weights if k.startswith(prefix)]
    save_file({k: v for k, v in weights.items() if k not in dropped}, folder / "model.safetensors", {"format": "pt"})
    return dropped


def test_missing_weights_raise_unless_a_head_is_built_from_another_class(qa_model, tmp_path, caplog):
    from transformers_mplug import MPLUGModel

    qa_model.save_pretrained(tmp_path / "qa")
    assert _drop_weights(tmp_path / "qa", "text_decoder.bert.encoder.layer.0.crossattention.self.query")
    with pytest.raises(ValueError, match=r"lacks 2 weight\(s\) of MPLUGForQuestionAnswering, in \['text_decoder'\]"):
        MPLUGForQuestionAnswering.from_pretrained(tmp_path / "qa")
    # the documented case: a head from a trunk folder; the head's own modules start fresh, with a warning
    trunk = MPLUGModel(tiny_config())
    trunk.save_pretrained(tmp_path / "trunk")
    with caplog.at_level("WARNING"):
        head = MPLUGForQuestionAnswering.from_pretrained(tmp_path / "trunk")
    assert "built from a MPLUGModel folder" in caplog.text and "text_decoder start fresh" in caplog.text
    assert torch.equal(
        head.mplug.vision_model.embeddings.class_embedding, trunk.vision_model.embeddings.class_embedding
    )
    # ... but not with a trunk that lacks its own weights
    assert _drop_weights(tmp_path / "trunk", "vision_model.post_layernorm")
    with pytest.raises(ValueError, match=r"a MPLUGModel folder\) lacks 2 weight\(s\).*\['mplug.vision_model'\]"):
        MPLUGForQuestionAnswering.from_pretrained(tmp_path / "trunk")
    with pytest.raises(ValueError, match=r"lacks 2 weight\(s\) of MPLUGModel"):
        MPLUGModel.from_pretrained(tmp_path / "trunk")
