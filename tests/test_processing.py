"""MPLUGProcessor / MPLUGImageProcessor: the original token contract, image pipeline, validation, round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoProcessor

from transformers_mplug import MPLUGImageProcessor, MPLUGProcessor
from transformers_mplug.image_processing_mplug import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from .conftest import require_reference


def _image(width=50, height=40, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


# ---------------------------------------------------------------------------------------------- text contract
def test_questions_have_cls_and_no_sep(processor):
    tok = processor.tokenizer
    batch = processor(text=["what is the color of the cat", "how many dogs"])
    ids = batch["input_ids"]
    expected0 = [tok.cls_token_id] + tok.convert_tokens_to_ids(["what", "is", "the", "color", "of", "the", "cat"])
    assert ids[0].tolist() == expected0
    assert tok.unk_token_id not in expected0  # real words are not [UNK]
    expected1 = [tok.cls_token_id] + tok.convert_tokens_to_ids(["how", "many", "dog", "##s"])
    assert ids[1].tolist() == expected1 + [0] * (len(expected0) - len(expected1))
    assert batch["attention_mask"][1].tolist() == [1] * len(expected1) + [0] * (len(expected0) - len(expected1))
    assert tok.sep_token_id not in ids[0].tolist()


def test_targets_end_with_sep_and_pad_as_minus_100(processor):
    tok = processor.tokenizer
    batch = processor(text=["what is the cat", "how many"], text_target=["red cat", "two"])
    assert batch["labels"][0].tolist() == [101, *tok.convert_tokens_to_ids(["red", "cat"]), 102]
    assert batch["labels"][1].tolist() == [101, tok.convert_tokens_to_ids("two"), 102, -100]
    assert batch["decoder_attention_mask"][1].tolist() == [1, 1, 1, 0]
    # a textual [SEP] stays one special token, as the original's `answer + "[SEP]"`
    assert processor.encode_text("red[SEP]")["input_ids"][0].tolist() == batch["labels"][0].tolist()[:1] + [
        tok.convert_tokens_to_ids("red"),
        102,
    ]


def test_truncation_keeps_cls_and_first_pieces(processor):
    out = processor.encode_text("what is the color of the cat", truncation=True, max_length=4)
    assert out["input_ids"][0].tolist() == [101, *processor.tokenizer.convert_tokens_to_ids(["what", "is", "the"])]
    padded = processor.encode_text(["what is", "cat"], padding="max_length", max_length=6)
    assert padded["input_ids"].shape == (2, 6) and padded["attention_mask"][1].tolist() == [1, 1, 0, 0, 0, 0]


def test_pair_encoding(processor):
    out = processor(text="what is the cat", text_pair="red")
    ids = out["input_ids"][0].tolist()
    assert ids[0] == 101 and ids.count(102) == 2 and ids[-1] == 102
    assert out["token_type_ids"][0].tolist()[-2:] == [1, 1]


def test_decode_strips_special_tokens(processor):
    tok = processor.tokenizer
    ids = [101, *tok.convert_tokens_to_ids(["red", "cat"]), 102, 0, 0]
    assert processor.decode(ids) == "red cat"
    assert processor.batch_decode(torch.tensor([ids, ids])) == ["red cat", "red cat"]
    assert processor.decode([101, 5, 102]) == "[unused4]"  # unused tokens are ordinary vocabulary


# ---------------------------------------------------------------------------------------------- images
def test_image_pipeline_is_bicubic_resize_then_clip_normalisation(processor):
    image = _image()
    pixel_values = processor(images=image)["pixel_values"]
    assert pixel_values.shape == (1, 3, 32, 32) and pixel_values.dtype == torch.float32
    resized = np.asarray(image.resize((32, 32), Image.Resampling.BICUBIC), dtype=np.float32) / 255.0
    expected = (resized - np.array(OPENAI_CLIP_MEAN, np.float32)) / np.array(OPENAI_CLIP_STD, np.float32)
    torch.testing.assert_close(pixel_values[0], torch.from_numpy(expected.transpose(2, 0, 1)), atol=1e-6, rtol=1e-6)


def test_image_input_types_agree(processor):
    image = _image()
    array = np.asarray(image)
    reference = processor(images=image)["pixel_values"]
    for variant in (
        array,
        array.transpose(2, 0, 1),
        torch.from_numpy(array.copy()),
        array.astype(np.float32) / 255.0,
        image.convert("RGBA"),
        [image],
    ):
        torch.testing.assert_close(processor(images=variant)["pixel_values"], reference, atol=1e-6, rtol=0)
    gray = processor(images=image.convert("L"))["pixel_values"]
    assert gray.shape == (1, 3, 32, 32)


def test_videos_give_five_dimensional_pixel_values(processor):
    frames = [_image(seed=s) for s in range(3)]
    single = processor(videos=frames, text="what is the cat")
    assert single["pixel_values"].shape == (1, 3, 3, 32, 32)
    batch = processor(videos=[frames, frames[::-1]], text=["what is", "the cat"])
    assert batch["pixel_values"].shape == (2, 3, 3, 32, 32)
    torch.testing.assert_close(batch["pixel_values"][1, 0], processor(images=frames[2])["pixel_values"][0])
    nested = processor(images=[frames, frames])  # a list of frame lists is read as videos
    assert nested["pixel_values"].shape == (2, 3, 3, 32, 32)
    mixed_sizes = processor(videos=[_image(50, 40), _image(20, 60)])
    assert mixed_sizes["pixel_values"].shape == (1, 2, 3, 32, 32)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(), ValueError, "nothing to process"),
        (dict(text=""), ValueError, r"text\[0\]"),
        (dict(text=["what", "  "]), ValueError, r"text\[1\]"),
        (dict(text=[]), ValueError, "text"),
        (dict(text=42), TypeError, "text"),
        (dict(images="not an image"), TypeError, "images"),
        (dict(images=[]), ValueError, "images"),
        (dict(images=Image.new("RGB", (0, 10))), ValueError, "images"),
        (dict(images=np.zeros((10, 0, 3), np.uint8)), ValueError, "images"),
        (dict(images=np.full((8, 8, 3), 2.0, np.float32)), ValueError, "images"),
        (dict(images=[_image(), _image()], text="what"), ValueError, "Batch size mismatch"),
        (dict(text=["what", "cat"], text_target=["red"]), ValueError, "text_target"),
        (dict(videos=[[_image()], [_image(), _image()]]), ValueError, "same number of frames"),
        (dict(videos=[[]]), ValueError, "videos"),
        (dict(images=_image(), videos=[_image()]), ValueError, "either"),
        (dict(text="cat", truncation=True, max_length=0), ValueError, "max_length"),
        (dict(text="cat", padding="sideways"), ValueError, "padding"),
        (dict(text="cat", colour="red"), TypeError, "colour"),
    ],
)
def test_bad_inputs_raise_naming_the_argument(processor, kwargs, error, match):
    with pytest.raises(error, match=match):
        processor(**kwargs)


def test_image_processor_validates_its_config():
    with pytest.raises(ValueError, match="size"):
        MPLUGImageProcessor(size={"shortest_edge": 32})
    with pytest.raises(ValueError, match="resample"):
        MPLUGImageProcessor(resample="magic")
    with pytest.raises(ValueError, match="unknown"):
        MPLUGImageProcessor(do_center_crop=True)


# ---------------------------------------------------------------------------------------------- round trip
def test_save_and_auto_processor_round_trip(processor, tmp_path):
    from .conftest import tiny_config

    processor.save_pretrained(tmp_path)
    tiny_config().save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, MPLUGProcessor)
    assert isinstance(loaded.image_processor, MPLUGImageProcessor)
    assert isinstance(AutoImageProcessor.from_pretrained(tmp_path), MPLUGImageProcessor)
    assert loaded.image_processor.size == {"height": 32, "width": 32}
    inputs = dict(
        images=[_image(), _image(seed=1)],
        text=["What is the COLOR of the cat", "two dogs"],
        text_target=["red", "blue cat"],
    )
    a, b = processor(**inputs), loaded(**inputs)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------- original contract
@pytest.fixture(scope="module")
def reference_tokenizer():
    folder = require_reference("tokenizer")
    inputs = torch.load(folder / "inputs.pt", weights_only=True)
    outputs = torch.load(folder / "outputs.pt", weights_only=True)
    processor = MPLUGProcessor.from_vocab_file(folder.parent / "configs" / "vocab.txt", image_size=16)
    return processor, inputs, outputs


def test_original_token_ids(reference_tokenizer):
    processor, inputs, outputs = reference_tokenizer
    tok = processor.tokenizer
    for name, token_id in outputs["special_token_ids"].items():
        assert tok.convert_tokens_to_ids(name) == token_id, name
    assert len(tok) == outputs["vocab_size"]

    def ids(text, **kwargs):
        return processor.encode_text(text, return_tensors=None, **kwargs)["input_ids"][0]

    assert [ids(q) for q in inputs["questions"]] == outputs["questions_ids"]
    assert [ids(a) for a in inputs["answer_strings"]] == outputs["answer_strings_ids"]
    assert [ids(a.replace("[SEP]", ""), add_eos=True) for a in inputs["answer_strings"]] == outputs[
        "answer_strings_ids"
    ]
    assert [ids(c) for c in inputs["caption_strings"]] == outputs["caption_strings_ids"]
    assert ids(inputs["prompt"]) == outputs["prompt_ids"]
    for text, expected, truncated, tokens in zip(
        inputs["misc_texts"], outputs["misc_texts_ids"], outputs["misc_truncated"], outputs["misc_texts_tokens"]
    ):
        if not text:  # the original encodes "" as [CLS]; the processor rejects empty text as a user error
            assert expected == [101]
            continue
        assert ids(text) == expected, text
        assert ids(text, truncation=True, max_length=inputs["truncation_max_length"]) == truncated, text
        assert tok.tokenize(text) == tokens


def test_original_padded_batches_pairs_and_decoding(reference_tokenizer):
    processor, inputs, outputs = reference_tokenizer
    batch = processor(text=inputs["questions"])
    assert torch.equal(batch["input_ids"], outputs["questions_batch_longest"]["input_ids"])
    assert torch.equal(batch["attention_mask"], outputs["questions_batch_longest"]["attention_mask"])
    batch = processor(text=inputs["caption_strings"], padding="max_length", truncation=True, max_length=30)
    assert torch.equal(batch["input_ids"], outputs["captions_max_length_30"]["input_ids"])
    assert torch.equal(batch["attention_mask"], outputs["captions_max_length_30"]["attention_mask"])
    pair = processor(text=inputs["pair"][0], text_pair=inputs["pair"][1], return_tensors=None)
    assert pair["input_ids"][0] == outputs["pair"]["input_ids"]
    assert pair["token_type_ids"][0] == outputs["pair"]["token_type_ids"]
    assert [processor.decode(ids) for ids in inputs["decode_ids"]] == outputs["decoded_postprocessed"]


def test_encode_labels_pads_with_minus_100(processor):
    labels = processor.encode_labels(["red cat", "two"])
    tok = processor.tokenizer
    assert labels[0].tolist() == [101, *tok.convert_tokens_to_ids(["red", "cat"]), 102]
    assert labels[1].tolist() == [101, tok.convert_tokens_to_ids("two"), 102, -100]
