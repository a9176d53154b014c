"""examples/run_captioning.py (cross-entropy and SCST), run_retrieval.py and run_grounding.py as a user runs them
(tiny models, a few steps), their data options and errors, and the SCST loss itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from transformers_mplug import (
    MPLUGConfig,
    MPLUGForCaptioning,
    MPLUGForGrounding,
    MPLUGForRetrieval,
    MPLUGProcessor,
    self_critical_loss,
)
from transformers_mplug.data import shapes_examples
from transformers_mplug.metrics import CiderD

from .conftest import REPO_ROOT, fit_fixed_batch

TINY = "--vision_width 32 --vision_layers 1 --text_width 32 --image_size 32 --patch_size 16"
TINY += " --per_device_train_batch_size 8 --per_device_eval_batch_size 8 --logging_steps 1"


def run(script: str, tmp_path: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "examples" / script), *TINY.split(), *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env=env,
    )
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def small_run(tmp_path: Path, name: str, steps: int = 3) -> list[str]:
    return [
        "--output_dir",
        str(tmp_path / name),
        "--num_train_examples",
        "32",
        "--num_eval_examples",
        "12",
        "--max_steps",
        str(steps),
    ]


# ------------------------------------------------------------------------------------------------ captioning
def test_run_captioning_then_scst_from_the_saved_folder(tmp_path):
    run("run_captioning.py", tmp_path, *small_run(tmp_path, "xe", steps=4), "--decoder_layers", "1")
    metrics = json.loads((tmp_path / "xe" / "metrics.json").read_text())
    assert {"eval_BLEU_1", "eval_BLEU_4", "eval_CIDEr_D", "eval_loss"} <= set(metrics) and not metrics["scst"]
    model = MPLUGForCaptioning.from_pretrained(tmp_path / "xe")
    # saved with the decoding it was evaluated with
    assert (model.generation_config.decoding_mode, model.generation_config.num_beams) == ("original", 1)
    assert (tmp_path / "xe" / "training_curves.png").exists()
    run(
        "run_captioning.py",
        tmp_path,
        *small_run(tmp_path, "scst", steps=2),
        "--model_name_or_path",
        str(tmp_path / "xe"),
        "--scst",
        "--scst_num_beams",
        "3",
        "--max_new_tokens",
        "6",
        "--min_new_tokens",
        "1",
        "--eval_strategy",
        "no",
    )
    metrics = json.loads((tmp_path / "scst" / "metrics.json").read_text())
    assert metrics["scst"] and "last_scst_reward" in metrics and metrics["last_scst_reward"] >= 0
    assert "eval_CIDEr_D" in metrics  # the SCST model is evaluated like the cross-entropy one


def test_run_captioning_reads_alicemind_caption_annotations(tmp_path):
    rows = shapes_examples(6, seed=4, image_size=32)
    (tmp_path / "images").mkdir()
    annotations = []
    for index, row in enumerate(rows):
        row["image"].save(tmp_path / "images" / f"{index}.png")
        annotations.append({"image": f"{index}.png", "caption": [row["caption"], row["description"]]})
    (tmp_path / "train.json").write_text(json.dumps(annotations))
    run(
        "run_captioning.py",
        tmp_path,
        "--output_dir",
        str(tmp_path / "out"),
        "--train_file",
        str(tmp_path / "train.json"),
        "--annotation_format",
        "alicemind",
        "--image_root",
        str(tmp_path / "images"),
        "--max_steps",
        "1",
        "--decoder_layers",
        "1",
    )
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["eval_CIDEr_D"] >= 0
    annotations[2]["caption"] = [""]
    (tmp_path / "bad.json").write_text(json.dumps(annotations))
    bad = run(
        "run_captioning.py",
        tmp_path,
        "--output_dir",
        str(tmp_path / "bad"),
        "--train_file",
        str(tmp_path / "bad.json"),
        "--annotation_format",
        "alicemind",
        "--image_root",
        str(tmp_path / "images"),
        check=False,
    )
    assert bad.returncode != 0 and "entry 2" in bad.stderr


def _tiny_captioner() -> MPLUGForCaptioning:
    torch.manual_seed(0)
    config = MPLUGConfig(
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=16,
        ),
        text_config=dict(
            vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
        ),
        num_cross_modal_layers=1,
        num_decoder_layers=1,
        bos_token_id=1,
        eos_token_id=2,
    )
    return MPLUGForCaptioning(config)


def test_self_critical_loss_raises_the_reward():
    model = _tiny_captioner()
    pixel_values = torch.randn(2, 3, 32, 32)

    def decode(sequences):
        return [" ".join(map(str, row.tolist())) for row in sequences]

    with torch.no_grad():
        beams = model.eval().generate(
            pixel_values=pixel_values, num_beams=4, num_return_sequences=4, max_new_tokens=5, min_new_tokens=1
        )
    hypotheses = [set(h.split()) for h in decode(beams[:4, 1:])]
    # reward: how often a token appears that some, not all, of the first image's hypotheses contain
    token = next(t for t in sorted(set.union(*hypotheses)) if 0 < sum(t in h for h in hypotheses) < 4)

    def reward(captions, references):
        return [float(c.split().count(token)) for c in captions]

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    means = []
    for _ in range(6):
        loss, rewards = self_critical_loss(
            model, pixel_values, [["a"], ["b"]], reward, decode, num_beams=4, max_new_tokens=5, min_new_tokens=1
        )
        assert rewards.shape == (2, 4)
        means.append(float(rewards.mean()))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert means[-1] > means[0]  # the policy moved towards the rewarded token
    with pytest.raises(ValueError, match="num_beams"):
        self_critical_loss(model, pixel_values, [["a"], ["b"]], reward, decode, num_beams=1)
    with pytest.raises(ValueError, match="references"):
        self_critical_loss(model, pixel_values, [["a"]], reward, decode)


def test_advantage_is_zero_when_every_hypothesis_scores_the_same():
    model = _tiny_captioner()
    loss, rewards = self_critical_loss(
        model, torch.randn(1, 3, 32, 32), [["x"]], lambda c, r: [1.0] * len(c), lambda s: ["x"] * len(s), num_beams=3
    )
    assert torch.equal(rewards, torch.ones(1, 3)) and float(loss.detach()) == 0.0


def test_cider_scorer_matches_the_corpus_metric():
    from transformers_mplug.metrics import cider_d

    predictions = ["a red circle", "a blue square and a red circle", "two green triangles"]
    references = [["a red circle", "red circle"], ["a blue square and a red circle"], ["a green triangle"]]
    scores = CiderD(references).scores(predictions, references)
    assert sum(scores) / 3 == pytest.approx(cider_d(predictions, references))
    assert scores[1] > scores[2]


# ------------------------------------------------------------------------------------------------ retrieval
def test_run_retrieval_reports_recall_through_the_retrieval_api(tmp_path):
    run(
        "run_retrieval.py",
        tmp_path,
        *small_run(tmp_path, "out"),
        "--text_layers",
        "1",
        "--cross_modal_layers",
        "2",
        "--k_test",
        "4",
    )
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    for key in ("eval_txt_r1", "eval_txt_r5", "eval_txt_r10", "eval_img_r1", "eval_img_r10", "eval_r_mean"):
        assert 0 <= metrics[key] <= 100
    assert metrics["eval_img_r1"] <= metrics["eval_img_r5"] <= metrics["eval_img_r10"]
    assert metrics["chance_r1"] == pytest.approx(100 / metrics["eval_gallery_size"])
    model, info = MPLUGForRetrieval.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert metrics["train_seconds"] > 0


def test_run_retrieval_errors_name_the_column(tmp_path):
    result = run("run_retrieval.py", tmp_path, *small_run(tmp_path, "out"), "--text_column", "nope", check=False)
    assert result.returncode != 0 and "`nope`" in result.stderr


# ------------------------------------------------------------------------------------------------ grounding
def test_run_grounding_reports_acc_at_05(tmp_path):
    run(
        "run_grounding.py",
        tmp_path,
        *small_run(tmp_path, "out"),
        "--text_layers",
        "1",
        "--cross_modal_layers",
        "2",
        "--decoder_layers",
        "1",
    )
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert 0 <= metrics["eval_acc_at_0.5"] <= 1 and 0 <= metrics["mean_box_acc_at_0.5"] <= 1
    model = MPLUGForGrounding.from_pretrained(tmp_path / "out")
    processor = MPLUGProcessor.from_pretrained(tmp_path / "out")
    # the demo's coordinate tokens travel with the folder
    assert processor.num_coordinate_bins == model.config.num_coordinate_bins == 64
    assert processor.coordinate_token_start_id == model.config.coordinate_token_start_id
    row = shapes_examples(1, seed=9, image_size=32)[0]
    batch = processor.prepare_grounding(row["image"], row["phrase"])
    boxes = processor.post_process_grounding(
        model.predict_boxes(batch["pixel_values"], batch["input_ids"], batch["attention_mask"]),
        batch["image_geometry"],
    )
    assert len(boxes) == 1 and len(boxes[0]["box"]) == 4


def test_run_grounding_rejects_rows_without_a_phrase(tmp_path):
    rows = shapes_examples(8, seed=4, image_size=32)
    (tmp_path / "images").mkdir()
    records = []
    for index, row in enumerate(rows):
        row["image"].save(tmp_path / "images" / f"{index}.png")
        records.append({"image": f"{index}.png", "phrase": row["phrase"] if index != 3 else "", "box": row["box"]})
    (tmp_path / "refs.json").write_text(json.dumps(records))
    result = run(
        "run_grounding.py",
        tmp_path,
        "--output_dir",
        str(tmp_path / "out"),
        "--train_file",
        str(tmp_path / "refs.json"),
        "--image_root",
        str(tmp_path / "images"),
        "--per_device_train_batch_size",
        "8",
        "--max_steps",
        "1",
        "--dataloader_drop_last",
        "False",
        check=False,
    )
    assert result.returncode != 0 and "`phrase` is empty" in result.stderr


# ------------------------------------------------------------------------------------------------ visual entailment
def test_visual_entailment_head_shapes_loss_save_load_and_batching(tmp_path):
    from transformers_mplug import MPLUGForVisualEntailment

    from .conftest import tiny_config, tiny_inputs

    torch.manual_seed(0)
    config = tiny_config(id2label={0: "entailment", 1: "neutral", 2: "contradiction"})
    model = MPLUGForVisualEntailment(config).eval()
    inputs = tiny_inputs(config, padded=True)
    labels = torch.tensor([0, 2, 1])
    with torch.no_grad():
        out = model(**inputs, labels=labels)
    assert out.logits.shape == (3, 3)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(out.logits, labels))
    with torch.no_grad():  # padded batch == one by one
        for row in range(3):
            keep = int(inputs["attention_mask"][row].sum())
            alone = model(
                pixel_values=inputs["pixel_values"][row : row + 1], input_ids=inputs["input_ids"][row : row + 1, :keep]
            )
            torch.testing.assert_close(alone.logits[0], out.logits[row], atol=1e-5, rtol=1e-4)
    model.save_pretrained(tmp_path)
    loaded, info = MPLUGForVisualEntailment.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and loaded.config.id2label[2] == "contradiction"
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, out.logits, atol=0, rtol=0)
    with pytest.raises(ValueError, match="class ids"):
        model(**inputs, labels=torch.tensor([0, 3, 1]))
    with pytest.raises(ValueError, match="shape"):
        model(**inputs, labels=torch.tensor([0, 1]))


def test_entailment_examples_are_balanced_and_consistent():
    from transformers_mplug.data import ENTAILMENT_LABELS, shapes_entailment_examples

    rows = shapes_entailment_examples(300, seed=3, image_size=32)
    counts = [sum(r["label"] == k for r in rows) for k in range(3)]
    assert counts == [100, 100, 100]
    for row in rows:
        assert ENTAILMENT_LABELS[row["label"]] == row["label_name"]
        if row["label_name"] == "neutral":
            assert " behind the " in row["hypothesis"]
    again = shapes_entailment_examples(300, seed=3, image_size=32)
    assert [r["hypothesis"] for r in again] == [r["hypothesis"] for r in rows]


def test_run_ve_trains_and_saves(tmp_path):
    result = run(
        "run_ve.py",
        tmp_path,
        "--output_dir",
        str(tmp_path / "out"),
        "--num_train_examples",
        "48",
        "--num_eval_examples",
        "12",
        "--max_steps",
        "12",
        "--learning_rate",
        "1e-3",
        "--warmup_steps",
        "0",
        "--text_layers",
        "1",
        "--cross_modal_layers",
        "2",
        "--eval_strategy",
        "no",
    )
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert 0 <= metrics["eval_accuracy"] <= 1 and metrics["majority_class_accuracy"] == pytest.approx(1 / 3, abs=0.2)
    losses = [float(x) for x in __import__("re").findall(r"'loss': '([0-9.]+)'", result.stdout + result.stderr)]
    assert len(losses) == 12 and all(0 < loss < 5 for loss in losses)  # logged every step
    from transformers_mplug import MPLUGForVisualEntailment

    assert MPLUGForVisualEntailment.from_pretrained(tmp_path / "out").config.num_labels == 3


def test_run_ve_rejects_unknown_labels(tmp_path):
    rows = shapes_examples(6, seed=4, image_size=32)
    (tmp_path / "images").mkdir()
    records = []
    for index, row in enumerate(rows):
        row["image"].save(tmp_path / "images" / f"{index}.png")
        records.append({"image": f"{index}.png", "hypothesis": "there is a red circle", "label": "maybe"})
    (tmp_path / "ve.json").write_text(json.dumps(records))
    result = run(
        "run_ve.py",
        tmp_path,
        "--output_dir",
        str(tmp_path / "out"),
        "--train_file",
        str(tmp_path / "ve.json"),
        "--image_root",
        str(tmp_path / "images"),
        "--max_steps",
        "1",
        check=False,
    )
    assert result.returncode != 0 and "'maybe' is not one of" in result.stderr


def test_a_few_steps_reduce_the_entailment_loss_on_the_embedded_data(shapes_processor):
    from transformers_mplug import MPLUGForVisualEntailment
    from transformers_mplug.data import shapes_entailment_examples

    from .conftest import tiny_config

    rows = shapes_entailment_examples(12, seed=0, image_size=32)
    batch = dict(shapes_processor(images=[r["image"] for r in rows], text=[r["hypothesis"] for r in rows]))
    labels = torch.tensor([r["label"] for r in rows])
    torch.manual_seed(0)
    config = tiny_config(
        text_config=dict(
            vocab_size=len(shapes_processor.tokenizer),
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
        ),
        id2label=dict(enumerate(["entailment", "neutral", "contradiction"])),
    )
    losses = fit_fixed_batch(MPLUGForVisualEntailment(config), batch, labels)
    assert losses[-1] < 0.6 * losses[0], losses  # the head and trunk fit a fixed batch of embedded rows


def test_retrieval_evaluation_gallery_holds_each_image_once(processor):
    """Rows sharing an image (its several captions) give one gallery image whose truth is all its texts; a repeated
    text keeps its first image; an image left without texts leaves the gallery."""
    import datasets
    import numpy as np
    from PIL import Image

    from transformers_mplug.metrics import retrieval_recall

    from .conftest import tiny_config

    sys.path.insert(0, str(REPO_ROOT / "examples"))
    try:
        import mplug_examples
    finally:
        sys.path.pop(0)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(4)]
    rows = [(0, "a red cat"), (0, "a cat"), (1, "two dogs"), (2, "a blue sofa"), (1, "a red cat"), (3, "two dogs")]
    dataset = datasets.Dataset.from_dict(
        {"image": [images[i] for i, _ in rows], "text": [t for _, t in rows]}
    ).cast_column("image", datasets.Image())
    torch.manual_seed(0)
    model = MPLUGForRetrieval(tiny_config(projection_dim=16)).eval()
    encoded = []
    encode_image = model.mplug.encode_image
    model.mplug.encode_image = lambda pixel_values, *a, **kw: (
        encoded.append(len(pixel_values)) or encode_image(pixel_values, *a, **kw)
    )
    recall = mplug_examples.retrieval_evaluation(model, processor, dataset, "image", "text", k=3)
    model.mplug.encode_image = encode_image
    assert (recall["gallery_size"], recall["gallery_texts"], sum(encoded)) == (3, 4, 3)
    # the same figures from retrieve over the gallery built by hand: images 0, 1, 2; texts with their truths
    texts = ["a red cat", "a cat", "two dogs", "a blue sofa"]
    gallery = processor(images=images[:3])["pixel_values"]
    result = model.retrieve(gallery, **processor(text=texts), k=3)
    itc = retrieval_recall(result.similarity, result.similarity.t(), [0, 0, 1, 2], [[0, 1], [2], [3]])
    assert {k: recall[f"itc_{k}"] for k in itc} == pytest.approx(itc)


def test_run_retrieval_evaluation_on_two_processes_equals_one(tmp_path, cpu_launch, shapes_processor):
    """`run_retrieval.py --eval_only` under `accelerate launch --num_processes 2` (retrieve split across the ranks)
    reports the one-process recalls."""
    from .conftest import tiny_config

    torch.manual_seed(0)
    text = dict(vocab_size=160, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    MPLUGForRetrieval(tiny_config(text_config=text, projection_dim=16)).save_pretrained(tmp_path / "trained")
    shapes_processor.save_pretrained(tmp_path / "trained")
    evaluation = ["--model_name_or_path", str(tmp_path / "trained"), "--eval_only", "--k_test", "4"]
    evaluation += ["--num_train_examples", "32", "--num_eval_examples", "12"]
    run("run_retrieval.py", tmp_path, "--output_dir", str(tmp_path / "one"), *evaluation)
    script = REPO_ROOT / "examples" / "run_retrieval.py"
    cpu_launch(script, *TINY.split(), "--output_dir", str(tmp_path / "two"), *evaluation, cwd=tmp_path)
    one, two = (json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("one", "two"))
    assert (one["world_size"], two["world_size"]) == (1, 2)
    recalls = sorted(key for key in one if key.startswith("eval_") and key.endswith(("r1", "r5", "r10", "r_mean")))
    assert len(recalls) >= 12
    assert {key: two[key] for key in recalls} == pytest.approx({key: one[key] for key in recalls})
    assert two["eval_gallery_size"] == one["eval_gallery_size"]
