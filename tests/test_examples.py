"""examples/run_vqa.py as a user runs it (tiny model, a few steps), its data options and its errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import pipeline

from transformers_mplug import MPLUGForQuestionAnswering
from transformers_mplug.data import shapes_examples

from .conftest import REPO_ROOT

TINY = [
    "--vision_width",
    "32",
    "--vision_layers",
    "1",
    "--text_width",
    "32",
    "--text_layers",
    "1",
    "--cross_modal_layers",
    "2",
    "--decoder_layers",
    "1",
    "--image_size",
    "32",
    "--patch_size",
    "16",
    "--per_device_train_batch_size",
    "8",
    "--per_device_eval_batch_size",
    "8",
    "--logging_steps",
    "1",
]


def run_vqa(tmp_path: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "examples" / "run_vqa.py"), *TINY, *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env=env,
    )
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def test_run_vqa_on_the_embedded_dataset(tmp_path):
    out = tmp_path / "out"
    result = run_vqa(
        tmp_path,
        "--output_dir",
        str(out),
        "--num_train_examples",
        "48",
        "--num_eval_examples",
        "16",
        "--num_train_epochs",
        "2",
        "--demo_questions",
        "2",
        "--questions_per_scene",
        "3",
    )
    expected_rows = len(shapes_examples(48, seed=0, image_size=32, describe=True, questions_per_scene=3))
    assert f"train {expected_rows} examples, validation 16" in result.stderr  # 1 describe + up to 3 questions a scene
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["eval_vqa_accuracy"] <= 1.0 and "prior_baseline_vqa_accuracy" in metrics
    assert (out / "training_curves.png").stat().st_size > 1000
    model = MPLUGForQuestionAnswering.from_pretrained(out)
    # saved with the decoding it was evaluated with: the original beam search, 1 beam, 5 new tokens at most
    generation = model.generation_config
    assert (generation.decoding_mode, generation.num_beams, generation.max_new_tokens) == ("original", 1, 5)
    assert result.stdout.count("Q: ") == 2  # answered through pipeline("visual-question-answering")


def _write_json_dataset(tmp_path: Path, rows: list[dict]) -> Path:
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    records = []
    for index, row in enumerate(rows):
        name = f"{index}.png"
        row["image"].save(images / name)
        records.append({"image": name, "question": row["question"], "answers": row["answers"]})
    path = tmp_path / "train.json"
    path.write_text(json.dumps(records))
    return path


def test_run_vqa_from_json_files_and_alicemind_annotations(tmp_path):
    rows = shapes_examples(24, seed=5, image_size=32)
    train = _write_json_dataset(tmp_path, rows)
    run_vqa(
        tmp_path,
        "--output_dir",
        str(tmp_path / "json_out"),
        "--train_file",
        str(train),
        "--image_root",
        str(tmp_path / "images"),
        "--weights_column",
        "",
        "--num_train_epochs",
        "1",
        "--demo_questions",
        "0",
    )
    annotations = [
        {"image": f"{i}.png", "question": r["question"], "answer": r["vqa_answers"]} for i, r in enumerate(rows)
    ]
    path = tmp_path / "vqa_train.json"
    path.write_text(json.dumps(annotations))
    run_vqa(
        tmp_path,
        "--output_dir",
        str(tmp_path / "ali_out"),
        "--train_file",
        str(path),
        "--annotation_format",
        "alicemind",
        "--image_root",
        str(tmp_path / "images"),
        "--max_steps",
        "2",
        "--demo_questions",
        "0",
    )


def test_run_vqa_errors_name_the_problem(tmp_path):
    rows = shapes_examples(6, seed=5, image_size=32)
    train = _write_json_dataset(tmp_path, rows)
    missing = run_vqa(
        tmp_path,
        "--output_dir",
        str(tmp_path / "o1"),
        "--train_file",
        str(train),
        "--image_root",
        str(tmp_path / "images"),
        "--question_column",
        "query",
        check=False,
    )
    assert missing.returncode != 0 and "query" in missing.stderr
    (tmp_path / "images" / "3.png").write_bytes(b"not an image")
    broken = run_vqa(
        tmp_path,
        "--output_dir",
        str(tmp_path / "o2"),
        "--train_file",
        str(train),
        "--image_root",
        str(tmp_path / "images"),
        check=False,
    )
    assert broken.returncode != 0 and "Row 3" in broken.stderr


def test_resume_from_checkpoint_gives_the_same_weights(tmp_path):
    common = [
        "--num_train_examples",
        "32",
        "--num_eval_examples",
        "8",
        "--max_steps",
        "6",
        "--save_strategy",
        "steps",
        "--save_steps",
        "3",
        "--eval_strategy",
        "no",
        "--demo_questions",
        "0",
        "--learning_rate",
        "1e-3",
        "--lr_scheduler_type",
        "constant",
        "--warmup_steps",
        "0",
    ]
    run_vqa(tmp_path, "--output_dir", str(tmp_path / "full"), *common)  # uninterrupted, leaves checkpoint-3
    resumed = tmp_path / "resumed"  # a run that stopped at step 3 and continues from its checkpoint
    run_vqa(
        tmp_path,
        "--output_dir",
        str(resumed),
        *common,
        "--resume_from_checkpoint",
        str(tmp_path / "full" / "checkpoint-3"),
    )
    full = load_file(tmp_path / "full" / "model.safetensors")
    again = load_file(resumed / "model.safetensors")
    for name in full:
        torch.testing.assert_close(again[name], full[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize(("config", "stage"), [("ds_zero2.json", 2), ("ds_zero3.json", 3)])
def test_run_vqa_under_two_process_deepspeed(tmp_path, deepspeed_launch, config, stage):
    out = tmp_path / "out"
    launch, env = deepspeed_launch
    configs = REPO_ROOT / "examples" / "configs"
    command = [
        *launch(),
        str(REPO_ROOT / "examples" / "run_vqa.py"),
        *TINY,
        "--deepspeed",
        str(configs / config),
        "--bf16",
        "--gradient_checkpointing",
        "--max_steps",
        "3",
        "--num_train_examples",
        "32",
        "--num_eval_examples",
        "8",
        "--eval_strategy",
        "no",
        "--demo_questions",
        "1",
        "--save_strategy",
        "steps",
        "--save_steps",
        "3",
        "--output_dir",
        str(out),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["deepspeed_zero_stage"] == stage and metrics["world_size"] == 2
    model, info = MPLUGForQuestionAnswering.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]  # consolidated weights, strict reload
    weights = load_file(out / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    assert all(t.numel() > 0 for t in weights.values())
    assert result.stdout.count("Q: ") == 1  # answered through the pipeline from the saved folder
    # the step-3 checkpoint's ZeRO shards consolidate into an fp32 folder (tied weights restored, strict load)
    consolidated = tmp_path / "consolidated"
    done = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "examples" / "consolidate_deepspeed_checkpoint.py"),
            "--checkpoint_dir",
            str(out / "checkpoint-3"),
            "--output_dir",
            str(consolidated),
            "--processor_path",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    fp32, info = MPLUGForQuestionAnswering.from_pretrained(consolidated, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert {t.dtype for t in load_file(consolidated / "model.safetensors").values()} == {torch.float32}
    for name, tensor in model.state_dict().items():  # the bf16 weights saved at the end of the same 3 steps
        torch.testing.assert_close(fp32.state_dict()[name].to(torch.bfloat16), tensor, atol=2e-2, rtol=2e-2, msg=name)
    assert (fp32.generation_config.decoding_mode, fp32.generation_config.num_beams) == ("original", 1)
    answer = pipeline("visual-question-answering", model=str(consolidated))(Image.new("RGB", (32, 32)), "how many?")
    assert isinstance(answer[0]["answer"], str)


def test_alicemind_answer_weights_follow_the_original(tmp_path):
    sys.path.insert(0, str(REPO_ROOT / "examples"))
    try:
        import run_vqa
    finally:
        sys.path.pop(0)
    path = tmp_path / "ann.json"
    path.write_text(
        json.dumps(
            [
                {"image": "a.jpg", "question": "what?", "answer": ["red"] * 6 + ["blue"] * 4, "dataset": "vqa"},
                {"image": "b.jpg", "question": "where?", "answer": "left", "dataset": "vg"},
            ]
        )
    )
    rows = run_vqa._alicemind_rows(str(path))
    assert rows[0]["answers"] == ["red", "blue"] and rows[0]["answer_weights"] == pytest.approx([0.6, 0.4])
    assert rows[1]["answers"] == ["left"] and rows[1]["answer_weights"] == [0.5]
    path.write_text(json.dumps([{"image": "a.jpg", "question": "what?", "answer": [""]}]))
    with pytest.raises(ValueError, match="entry 0"):
        run_vqa._alicemind_rows(str(path))


def test_stale_extension_locks_are_named(tmp_path, monkeypatch, caplog):
    sys.path.insert(0, str(REPO_ROOT / "examples"))
    try:
        import mplug_examples
    finally:
        sys.path.pop(0)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    old = tmp_path / "py311_cpu" / "deepspeed_shm_comm" / "lock"
    fresh = tmp_path / "py311_cpu" / "cpu_adam" / "lock"
    for lock in (old, fresh):
        lock.parent.mkdir(parents=True)
        lock.touch()
    os.utime(old, (old.stat().st_atime - 3600, old.stat().st_mtime - 3600))
    with caplog.at_level("WARNING"):
        assert mplug_examples.warn_about_stale_extension_locks() == [old]  # a build running now is left alone
    assert str(old) in caplog.text and "60 min old" in caplog.text


def test_demo_vocabulary_replaces_a_partial_file_and_leaves_no_private_copy(tmp_path):
    sys.path.insert(0, str(REPO_ROOT / "examples"))
    try:
        import mplug_examples
    finally:
        sys.path.pop(0)
    (tmp_path / "vocab.txt").write_text("")  # what a reading rank saw while another rank was writing the file
    first = mplug_examples.demo_processor(tmp_path, 32)
    second = mplug_examples.demo_processor(tmp_path, 32)
    assert len(first.tokenizer) == len(second.tokenizer) > 104
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vocab.txt"]  # no private copies left behind


def test_vqa_metrics_per_question_type():
    sys.path.insert(0, str(REPO_ROOT / "examples"))
    try:
        import run_vqa
    finally:
        sys.path.pop(0)
    questions = ["How many shapes?", "how many circles?", "is there a dog?", "is there a cat?"]
    references = [["two"] * 10, ["one"] * 10, ["yes"] * 10, ["no"] * 7 + ["yes"] * 3]
    metrics = run_vqa.compute_vqa_metrics(["two", "three", "yes", "yes"], references, questions)
    assert metrics["vqa_accuracy[how many]"] == pytest.approx(0.5)
    assert metrics["vqa_accuracy[is there]"] == pytest.approx((1.0 + 0.9) / 2)  # 3 of 10 humans said yes
    assert metrics["vqa_accuracy"] == pytest.approx((1.0 + 0.0 + 1.0 + 0.9) / 4)
    assert set(run_vqa.compute_vqa_metrics(["two"], [["two"]])) == {"vqa_accuracy"}


def _examples_module(name: str):
    sys.path.insert(0, str(REPO_ROOT / "examples"))
    try:
        return __import__(name)
    finally:
        sys.path.pop(0)


def test_vqa_evaluation_encodes_each_image_once(processor):
    """run_vqa's evaluation over 3 images x 3 questions (interleaved rows, batches of 4 across image boundaries):
    3 images encoded in all, the answers of one `generate` per question, in row order."""
    import datasets
    import numpy as np
    from transformers import GenerationConfig

    from .conftest import tiny_config

    run_vqa = _examples_module("run_vqa")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(3)]
    questions = ["what is the cat", "how many dogs", "is it red", "where", "what colour is it", "is there a cat"]
    rows = {"image": [images[i % 3] for i in range(9)], "question": [questions[i % 6] for i in range(9)]}
    dataset = datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image())
    torch.manual_seed(0)
    model = MPLUGForQuestionAnswering(tiny_config()).eval()
    model.generation_config = GenerationConfig(
        decoding_mode="original", num_beams=2, max_new_tokens=4, bos_token_id=101, eos_token_id=102, pad_token_id=0
    )
    encoded = []
    encode_image = model.mplug.encode_image
    model.mplug.encode_image = lambda pixel_values, *a, **kw: (
        encoded.append(len(pixel_values)) or encode_image(pixel_values, *a, **kw)
    )
    args = run_vqa.DataArguments()
    predictions = run_vqa.generate_answers(model, processor, dataset, args, batch_size=4)
    assert sum(encoded) == 3
    model.mplug.encode_image = encode_image
    expected = [
        processor.decode(model.generate(**processor(images=images[i % 3], text=questions[i % 6]))[0]) for i in range(9)
    ]
    assert predictions == expected


def test_run_vqa_evaluation_on_two_processes_equals_one(tmp_path, cpu_launch, shapes_processor):
    """`run_vqa.py --eval_only` of a saved folder under `accelerate launch --num_processes 2` (each rank answers its
    share of the images, the answers gathered) gives the one-process answers and accuracy."""
    from .conftest import tiny_config

    trained = tmp_path / "trained"
    torch.manual_seed(0)
    text = dict(vocab_size=160, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    MPLUGForQuestionAnswering(tiny_config(text_config=text)).save_pretrained(trained)
    shapes_processor.save_pretrained(trained)
    common = ["--num_train_examples", "24", "--num_eval_examples", "14", "--questions_per_scene", "3"]
    common += ["--demo_questions", "0", "--eval_strategy", "no"]
    evaluation = ["--model_name_or_path", str(trained), "--eval_only", "--eval_num_beams", "2", *common]
    run_vqa(tmp_path, "--output_dir", str(tmp_path / "one"), *evaluation)
    cpu_launch(
        REPO_ROOT / "examples" / "run_vqa.py", *TINY, "--output_dir", str(tmp_path / "two"), *evaluation, cwd=tmp_path
    )
    one, two = (json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("one", "two"))
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert two["eval_vqa_accuracy"] == one["eval_vqa_accuracy"]
    answers = [json.loads((tmp_path / name / "eval_predictions.json").read_text()) for name in ("one", "two")]
    assert len(answers[0]) >= 14 and answers[1] == answers[0]
