"""Metrics against hand-computed cases and, where installed, pycocoevalcap."""

from __future__ import annotations

import pytest
import torch

from transformers_mplug.metrics import (
    CiderD,
    bleu,
    box_iou,
    caption_metrics,
    cider_d,
    grounding_accuracy,
    normalize_vqa_answer,
    ptb_tokenize,
    retrieval_recall,
    vqa_accuracy,
)


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("Two", "2"),
        ("the dog.", "dog"),
        ("yes!", "yes"),
        ("A Red-Car", "red car"),
        ("dont", "don't"),
        ("10,000", "10000"),
        ("none", "0"),
        ("an apple", "apple"),
    ],
)
def test_vqa_answer_normalization(raw, normalized):
    assert normalize_vqa_answer(raw) == normalized


def test_vqa_accuracy_leave_one_out():
    humans = ["red"] * 2 + ["blue"] * 8
    # "red": leaving out one of the 2 reds leaves 1 match (1/3), otherwise 2 (2/3): (2 * 1/3 + 8 * 2/3) / 10
    assert vqa_accuracy(["red"], [humans]) == pytest.approx(0.6)
    assert vqa_accuracy(["blue"], [humans]) == pytest.approx(1.0)
    assert vqa_accuracy(["green"], [humans]) == 0.0
    assert vqa_accuracy(["Two"], [["2"] * 3 + ["3"] * 7]) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)
    assert vqa_accuracy(["red", "blue"], [humans, humans]) == pytest.approx(0.8)
    with pytest.raises(ValueError):
        vqa_accuracy(["red"], [])


def test_ptb_tokenize():
    assert ptb_tokenize("A man's dog, running!") == ["a", "man", "'s", "dog", "running"]


def test_bleu_hand_cases():
    assert bleu(["a red circle and a square"], [["a red circle and a square"]]) == pytest.approx([1.0] * 4, abs=1e-6)
    scores = bleu(["the cat sat"], [["the cat sat on the mat"]])
    # precisions are 1 but the hypothesis is half the reference length: brevity penalty exp(1 - 6/3)
    assert scores[0] == pytest.approx(pytest.approx(2.718281828**-1.0, rel=1e-6))
    assert bleu(["dog"], [["a red circle"]])[0] < 1e-6


def test_cider_d_hand_cases():
    refs = [["a red circle"], ["a blue square"]]
    assert cider_d(["a red circle", "a blue square"], refs) > cider_d(["a blue square", "a red circle"], refs)
    assert cider_d(["nothing matches", "at all"], refs) == 0.0


def test_against_pycocoevalcap():
    bleu_scorer = pytest.importorskip("pycocoevalcap.bleu.bleu")
    cider_scorer = pytest.importorskip("pycocoevalcap.cider.cider")
    predictions = [
        "a red circle and a blue square",
        "a green triangle",
        "a yellow square and a red circle",
        "two dogs on a table",
        "a man riding a horse",
    ]
    references = [
        ["a red circle and a blue square", "a blue square and a red circle"],
        ["a green triangle", "one green triangle"],
        ["a red circle, a yellow square", "a yellow square and a red triangle"],
        ["a dog sitting on a table", "two dogs on the table"],
        ["a man on a horse", "a person riding a brown horse", "man riding horse"],
    ]
    gts = {i: [" ".join(ptb_tokenize(r)) for r in rs] for i, rs in enumerate(references)}
    res = {i: [" ".join(ptb_tokenize(p))] for i, p in enumerate(predictions)}
    expected_bleu, _ = bleu_scorer.Bleu(4).compute_score(gts, res, verbose=0)
    expected_cider, _ = cider_scorer.Cider().compute_score(gts, res)
    ours = caption_metrics(predictions, references)
    assert [ours[f"BLEU-{n}"] for n in range(1, 5)] == pytest.approx(expected_bleu, abs=1e-6)
    assert ours["CIDEr-D"] == pytest.approx(expected_cider, abs=1e-9)


def test_retrieval_recall_hand_case():
    # 2 images, 3 texts; texts 0,1 -> image 0, text 2 -> image 1
    i2t = torch.tensor([[0.1, 0.9, 0.5], [0.8, 0.2, 0.3]])
    t2i = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.4, 0.6]])
    result = retrieval_recall(i2t, t2i, text_to_image=[0, 0, 1], image_to_texts=[[0, 1], [2]], ks=(1, 2))
    assert result["txt_r1"] == 50.0 and result["txt_r2"] == 100.0  # image 1's text ranks second
    assert result["img_r1"] == pytest.approx(200 / 3) and result["img_r2"] == 100.0
    assert result["r_mean"] == pytest.approx((75.0 + (200 / 3 + 100) / 2) / 2)


def test_box_iou_and_grounding_accuracy():
    predicted = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0], [5.0, 5.0, 6.0, 6.0]])
    target = torch.tensor([[0.0, 0.0, 2.0, 1.0], [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
    torch.testing.assert_close(box_iou(predicted, target), torch.tensor([0.5, 1.0, 0.0]))
    assert grounding_accuracy(predicted, target) == pytest.approx(2 / 3)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: vqa_accuracy(["two"], ["two"]), TypeError, r"answers\[0\]` is a string"),
        (lambda: caption_metrics(["a cat"], ["a cat"]), TypeError, r"references\[0\]` is a string"),
        (lambda: bleu(["a cat"], ["a cat"]), TypeError, "wrap it"),
        (lambda: CiderD(["a cat"]), TypeError, "corpus_references"),
        (lambda: vqa_accuracy([], []), ValueError, "empty"),
        (lambda: caption_metrics([], []), ValueError, "empty"),
        (lambda: vqa_accuracy(["a", "b"], [["a"]]), ValueError, "2 `predictions` but 1 `answers`"),
        (lambda: bleu(["a", "b"], [["a"]]), ValueError, "2 `predictions` but 1"),
        (lambda: vqa_accuracy([None], [["a"]]), TypeError, r"predictions\[0\]"),
        (lambda: caption_metrics([None], [["a"]]), TypeError, r"predictions\[0\]"),
        (lambda: retrieval_recall(torch.eye(2), torch.eye(2), [0, 5], [[0], [1]]), ValueError, "text_to_image"),
        (lambda: retrieval_recall(torch.eye(2), torch.eye(2), [0, 1], [[0], [9]]), ValueError, "image_to_texts"),
        (lambda: retrieval_recall(torch.eye(2), torch.eye(2), [0], [[0], [1]]), ValueError, "one per image"),
        (lambda: retrieval_recall(torch.zeros(0, 0), torch.zeros(0, 0), [], []), ValueError, "empty"),
    ],
)
def test_bad_metric_inputs_raise_instead_of_scoring(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_references_as_lists_score_as_expected():
    assert vqa_accuracy(["two"], [["two"] * 4]) == 1.0
    assert caption_metrics(["a red cat"], [["a red cat"]])["BLEU-1"] == pytest.approx(1.0)
