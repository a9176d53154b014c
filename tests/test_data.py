"""The embedded shapes dataset and the collators."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from transformers_mplug.data import (
    MPLUGCaptioningCollator,
    MPLUGVQACollator,
    load_shapes_dataset,
    shapes_examples,
)


def test_shapes_are_deterministic_and_consistent():
    a, b = shapes_examples(20, seed=3, image_size=48), shapes_examples(20, seed=3, image_size=48)
    assert [r["question"] for r in a] == [r["question"] for r in b]
    assert all(np.array_equal(np.asarray(x["image"]), np.asarray(y["image"])) for x, y in zip(a, b))
    assert [r["question"] for r in shapes_examples(20, seed=4)] != [r["question"] for r in a]
    for row in a:
        objects = row["caption"].replace(" and ", ", ").split(", ")
        if row["question"].startswith("how many"):
            assert row["answers"][0] == {1: "one", 2: "two", 3: "three"}[len(objects)]
            assert row["answer_weights"] == [1.0, 0.3] and len(row["vqa_answers"]) == 10
        if row["question"].startswith("what color is the"):
            shape = row["question"].split()[-1].rstrip("?")
            assert f"{row['answers'][0]} {shape}" in row["caption"]
        x1, y1, x2, y2 = row["box"]
        assert 0 <= x1 < x2 <= 48 and 0 <= y1 < y2 <= 48
        color = np.asarray(row["image"])[int((y1 + y2) / 2), int((x1 + x2) / 2)]
        assert color.tolist() != [235, 235, 235]  # the phrase's object is drawn in its box


def test_every_word_is_in_the_vocabulary(shapes_processor):
    tok = shapes_processor.tokenizer
    for row in shapes_examples(50, seed=1):
        for text in (row["question"], row["caption"], row["phrase"], *row["answers"]):
            assert tok.unk_token_id not in tok(text, add_special_tokens=False)["input_ids"], text


def test_dataset_splits():
    dataset = load_shapes_dataset(num_train=12, num_eval=5, image_size=32)
    assert len(dataset["train"]) == 12 and len(dataset["validation"]) == 5
    assert dataset["train"][0]["image"].size == (32, 32)
    train_images = [np.asarray(row["image"]).tobytes() for row in dataset["train"]]
    assert not any(np.asarray(row["image"]).tobytes() in train_images for row in dataset["validation"])


def test_vqa_collator_flattens_weighted_answers(shapes_processor):
    rows = shapes_examples(4, seed=0, image_size=32)
    rows[1] = {**rows[1], "answers": ["red", "blue"], "answer_weights": [0.6, 0.4]}
    batch = MPLUGVQACollator(shapes_processor)(rows)
    counts = [len(r["answers"]) for r in rows]
    assert batch["pixel_values"].shape == (4, 3, 32, 32)
    assert batch["answers_per_question"].tolist() == counts
    assert batch["labels"].shape[0] == sum(counts) == batch["answer_weights"].shape[0]
    assert batch["answer_weights"][1:3].tolist() == pytest.approx([0.6, 0.4])
    assert torch.all(batch["labels"][:, 0] == 101)


def test_vqa_collator_errors_name_the_row_and_column(shapes_processor):
    rows = shapes_examples(2, seed=0, image_size=32)
    with pytest.raises(ValueError, match="Example 1.*answers"):
        MPLUGVQACollator(shapes_processor)([rows[0], {**rows[1], "answers": [""]}])
    with pytest.raises(KeyError, match="Example 0 has no `question`"):
        MPLUGVQACollator(shapes_processor)([{k: v for k, v in rows[0].items() if k != "question"}])
    with pytest.raises(ValueError, match="answer_weights"):
        MPLUGVQACollator(shapes_processor)([{**rows[0], "answers": ["red"], "answer_weights": [0.5, 0.5]}])


def test_captioning_collator_masks_the_prompt(shapes_processor):
    rows = shapes_examples(3, seed=0, image_size=32)
    batch = MPLUGCaptioningCollator(shapes_processor, prompt="a red")(rows)
    prompt_length = 3  # [CLS] a red
    assert torch.all(batch["labels"][:, :prompt_length] == -100)
    assert torch.all(batch["input_ids"][:, 1] == shapes_processor.tokenizer.convert_tokens_to_ids("a"))
    valid = batch["labels"] != -100
    assert torch.equal(batch["labels"][valid], batch["input_ids"][valid])
    with pytest.raises(ValueError, match="caption"):
        MPLUGCaptioningCollator(shapes_processor)([{**rows[0], "caption": " "}])


def test_describe_rows_only_in_training(shapes_processor):
    plain = shapes_examples(5, seed=2)
    described = shapes_examples(5, seed=2, describe=True)
    assert len(described) == 10
    assert [r["question"] for r in described[1::2]] == [r["question"] for r in plain]  # same scenes and questions
    for row in described[::2]:
        assert row["question"] == "what is in the picture?" and " at the " in row["answers"][0]
        assert (
            row["answers"][0]
            .replace(" at the top left", "")
            .replace(" at the top right", "")
            .replace(" at the bottom left", "")
            .replace(" at the bottom right", "")
            == row["caption"]
        )
    assert shapes_examples(2, seed=2, describe=True, describe_weight=0.25)[0]["answer_weights"] == [0.25]
    dataset = load_shapes_dataset(num_train=4, num_eval=3, image_size=32, describe=True)
    assert len(dataset["train"]) == 8 and len(dataset["validation"]) == 3
    assert "what is in the picture?" not in dataset["validation"]["question"]
    batch = MPLUGVQACollator(shapes_processor)(described[:2])
    assert shapes_processor.tokenizer.unk_token_id not in batch["labels"].flatten().tolist()


def _answer_from_scene(row) -> str:
    """The answer to a row's question worked out from its description (`a <colour> <shape> at the <place>, ...`)."""
    objects = [part.split(" at the ") for part in row["description"].replace(" and ", ", ").split(", ")]
    objects = [(what.split()[1], what.split()[2], place) for what, place in objects]
    words = row["question"].rstrip("?").split()
    if row["question"].startswith("how many"):
        return {1: "one", 2: "two", 3: "three"}[len(objects)]
    if row["question"].startswith("is there"):
        return "yes" if (words[3], words[4]) in {(c, s) for c, s, _ in objects} else "no"
    if row["question"].startswith("what color"):
        (match,) = [c for c, s, _ in objects if s == words[4]]
        return match
    if row["question"].startswith("what shape"):
        (match,) = [s for c, s, _ in objects if c == words[4]]
        return match
    (match,) = [p for c, s, p in objects if (c, s) == (words[3], words[4])]
    return match


def test_several_questions_per_scene():
    single = shapes_examples(30, seed=6)
    several = shapes_examples(30, seed=6, questions_per_scene=5)
    by_scene: dict[str, list[dict]] = {}
    for row in several:
        by_scene.setdefault(row["description"], []).append(row)
    assert len(by_scene) == 30 and len(several) > 3 * 30
    assert single[0]["question"] == several[0]["question"]  # the first question of a scene is the usual one
    for rows in by_scene.values():
        kinds = [" ".join(r["question"].split()[:2]) for r in rows]
        assert len(set(kinds)) == len(kinds) and {"how many", "is there"} <= set(kinds)
        for row in rows:
            assert row["answers"][0] == _answer_from_scene(row), row
            assert np.array_equal(np.asarray(row["image"]), np.asarray(rows[0]["image"]))
    assert all(r["answers"][0] == _answer_from_scene(r) for r in single)
    dataset = load_shapes_dataset(num_train=6, num_eval=4, image_size=32, questions_per_scene=3)
    assert len(dataset["train"]) == len(shapes_examples(6, seed=0, image_size=32, questions_per_scene=3)) > 12
    assert len(dataset["validation"]) == 4
    for bad in (0, 6):
        with pytest.raises(ValueError, match="questions_per_scene"):
            shapes_examples(2, questions_per_scene=bad)


def test_a_prompt_that_leaves_no_caption_token_is_refused(shapes_processor):
    with pytest.raises(ValueError, match="leaves no caption token within `max_length` 3"):
        MPLUGCaptioningCollator(shapes_processor, prompt="a red circle", max_length=3)
    MPLUGCaptioningCollator(shapes_processor, prompt="a red circle", max_length=5)  # room for one caption token


# ------------------------------------------------------------------------------------------------ task collators
def _image(value: int):
    from PIL import Image

    return Image.new("RGB", (40, 30), (value, 20, 200))


def test_retrieval_collator_batches_texts_ids_and_asks_for_the_loss(processor):
    from transformers_mplug.data import MPLUGRetrievalCollator

    rows = [{"image": _image(10), "caption": "a red cat", "image_id": 3}, {"image": _image(90), "caption": "two dogs"}]
    rows[1]["image_id"] = 3
    batch = MPLUGRetrievalCollator(processor, text_column="caption", idx_column="image_id")(rows)
    assert batch["pixel_values"].shape == (2, 3, 32, 32) and batch["return_loss"] is True
    assert batch["idx"].tolist() == [3, 3]
    assert torch.equal(batch["input_ids"], processor.encode_text(["a red cat", "two dogs"])["input_ids"])
    with pytest.raises(ValueError, match="Example 1: `caption` is empty"):
        MPLUGRetrievalCollator(processor)([rows[0], {"image": _image(1), "caption": " "}])


def test_classification_collator_maps_labels_for_single_images_and_pairs(processor):
    from transformers_mplug.data import MPLUGImageTextClassificationCollator

    label2id = {"entailment": 0, "neutral": 1, "contradiction": 2}
    rows = [
        {"image": _image(10), "hypothesis": "a cat", "label": "neutral"},
        {"image": _image(50), "hypothesis": "a dog", "label": 2},
    ]
    batch = MPLUGImageTextClassificationCollator(processor, label2id)(rows)
    assert batch["labels"].tolist() == [1, 2] and batch["pixel_values"].shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="label 'maybe' is not one of"):
        MPLUGImageTextClassificationCollator(processor, label2id)([dict(rows[0], label="maybe")])
    with pytest.raises(ValueError, match=r"label 3 is not a class id in \[0, 3\)"):
        MPLUGImageTextClassificationCollator(processor, label2id)([dict(rows[0], label=3)])
    pairs = [{"left": _image(1), "right": _image(200), "sentence": "two cats", "label": 1}]
    collator = MPLUGImageTextClassificationCollator(
        processor, {"false": 0, "true": 1}, text_column="sentence", pair_columns=("left", "right")
    )
    batch = collator(pairs)
    assert batch["pixel_values"].shape == (1, 2, 3, 32, 32) and batch["labels"].tolist() == [1]


def test_grounding_collator_normalises_pixel_boxes(processor):
    from transformers_mplug import MPLUGProcessor
    from transformers_mplug.data import MPLUGGroundingCollator

    grounding = MPLUGProcessor(
        processor.image_processor, processor.tokenizer, coordinate_start_token="[unused20]", num_coordinate_bins=33
    )
    rows = [{"image": _image(10), "phrase": "the cat", "box": [0, 0, 40, 30]}]
    batch = MPLUGGroundingCollator(grounding)(rows)
    expected = grounding.prepare_grounding([rows[0]["image"]], ["the cat"], boxes=[[0, 0, 40, 30]])
    torch.testing.assert_close(batch["boxes"], expected["boxes"])
    assert "image_geometry" not in batch
    with pytest.raises(ValueError, match=r"`box` must be \[x1, y1, x2, y2\]"):
        MPLUGGroundingCollator(grounding)([dict(rows[0], box=[1, 2])])
