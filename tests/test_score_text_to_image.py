"""examples/score_text_to_image.py: the VQA scorer of text-to-image benchmarks, on the embedded data and on a
converted ModelScope folder."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

from transformers_mplug import MPLUGForQuestionAnswering

from .conftest import REPO_ROOT, tiny_config

SCRIPT = REPO_ROOT / "examples" / "score_text_to_image.py"


def run_scorer(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *arguments], capture_output=True, text=True, timeout=300)


@pytest.fixture
def vqa_folder(tmp_path, shapes_processor):
    torch.manual_seed(0)
    vocab = len(shapes_processor.tokenizer)
    text = dict(
        vocab_size=vocab,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=40,
    )
    model = MPLUGForQuestionAnswering(tiny_config(text_config=text, bos_token_id=101, eos_token_id=102)).eval()
    model.generation_config.max_new_tokens = 4
    folder = tmp_path / "vqa"
    model.save_pretrained(folder)
    shapes_processor.save_pretrained(folder)
    return folder, model, shapes_processor


def test_scores_on_the_embedded_data_equal_one_question_at_a_time(vqa_folder, tmp_path):
    folder, model, processor = vqa_folder
    out = tmp_path / "scores"
    result = run_scorer(
        "--model_name_or_path", str(folder), "--demo_questions", "4", "--output_dir", str(out), "--batch_size", "3"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "scores.json").read_text())
    questions = summary["questions"]
    assert summary["num_images"] == 4 and len(questions) == summary["num_questions"] > 4
    assert any("choices" in q for q in questions) and any("choices" not in q for q in questions)
    for item in questions:
        inputs = processor(images=Image.open(item["image"]).convert("RGB"), text=item["question"])
        with torch.no_grad():
            if "choices" in item:
                candidates = processor.encode_text(item["choices"], add_eos=True)
                ranked = model.rank_answers(
                    candidates["input_ids"], candidates["attention_mask"], **inputs, k=len(item["choices"])
                )
                assert item["predicted"] == item["choices"][int(ranked.indices[0, 0])]
                assert item["score"] == pytest.approx(float(ranked.probabilities[0, 0]), abs=1e-5)
            else:
                assert item["predicted"] == processor.batch_decode(model.generate(**inputs))[0]
        assert item["correct"] == (item["predicted"].lower() == item["answer"].lower())
    means = [image["mean_correct"] for image in summary["images"]]
    assert summary["mean_over_images"] == pytest.approx(sum(means) / len(means))
    for image in summary["images"]:
        mine = [q["correct"] for q in questions if q["image"] == image["image"]]
        assert image["mean_correct"] == pytest.approx(sum(mine) / len(mine))


def test_bad_question_files_are_refused(vqa_folder, tmp_path):
    folder, _, _ = vqa_folder
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    for content, message in (
        ([{"image": "a.png"}], "question 0 needs a non-empty string `question`"),
        ([{"image": "missing.png", "question": "what?"}], "does not exist"),
        ([{"image": "a.png", "question": "what?", "choices": []}], "`choices` must be a non-empty list"),
        ([{"image": "a.png", "question": "what?", "answers": "x"}], "unknown field"),
    ):
        path = tmp_path / "q.json"
        path.write_text(json.dumps(content))
        result = run_scorer(
            "--model_name_or_path", str(folder), "--questions", str(path), "--output_dir", str(tmp_path / "out")
        )
        assert result.returncode == 1 and message in result.stderr, result.stderr


def test_the_scorer_on_a_converted_modelscope_folder_answers_as_modelscope(tmp_path):
    from .test_modelscope import modelscope_dir, run_converter

    variant = modelscope_dir("vqa_base")
    meta = json.loads((variant / "meta.json").read_text())
    folder = tmp_path / "converted"
    assert run_converter("--checkpoint_path", str(variant / "model"), "--output_dir", str(folder)).returncode == 0
    texts, images = meta["raw_inputs"]["texts"], meta["raw_inputs"]["images"]
    expected = meta["string_outputs"]["decoded(tokenizer.decode(..., skip_special_tokens=True))"]["generated_beam"]
    items = [
        {"image": str(variant / image), "question": text, "answer": answer}
        for image, text, answer in zip(images, texts, expected)
    ]
    items.append({"image": str(variant / images[0]), "question": texts[0], "choices": ["on", "dog", "red"]})
    path = tmp_path / "questions.json"
    path.write_text(json.dumps(items))
    result = run_scorer("--model_name_or_path", str(folder), "--questions", str(path), "--output_dir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "scores.json").read_text())
    assert [q["predicted"] for q in summary["questions"][:2]] == expected  # ModelScope's beam answers
    assert all(q["correct"] for q in summary["questions"][:2]) and summary["questions"][2]["correct"] is None
    assert summary["mean_over_images"] == 1.0
