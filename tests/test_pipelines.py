"""pipeline(...) support for mPLUG models (run on the newest transformers and, in a subprocess, on 5.2.x)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from transformers import CLIPConfig, CLIPModel, pipeline

from transformers_mplug import (
    MPLUGForCaptioning,
    MPLUGForGrounding,
    MPLUGForQuestionAnswering,
    MPLUGForRetrieval,
    MPLUGProcessor,
)
from transformers_mplug.pipelines import (
    MPLUGImageCaptioningPipeline,
    MPLUGVisualGroundingPipeline,
    MPLUGVisualQuestionAnsweringPipeline,
    MPLUGZeroShotImageClassificationPipeline,
)

from .conftest import REPO_ROOT, TF52_PATH, tiny_config

# a tiny vision tower for the other (non-mPLUG) models of these tests
OTHER_MODEL_VISION = dict(
    hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=16
)
GROUNDING = dict(grounding_prefix_token_id=20, coordinate_token_start_id=21, num_coordinate_bins=33)


@pytest.fixture
def image():
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8))


def saved(tmp_path, model, processor, name="model"):
    folder = tmp_path / name
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder)


# transformers 5.2.x still has its own visual-question-answering pipeline, which the package leaves registered
_VQA_ENTRY = transformers.pipelines.SUPPORTED_TASKS.get("visual-question-answering", {})
NATIVE_VQA = _VQA_ENTRY.get("impl", MPLUGVisualQuestionAnsweringPipeline) is not MPLUGVisualQuestionAnsweringPipeline
VQA_CLASS = {"pipeline_class": MPLUGVisualQuestionAnsweringPipeline} if NATIVE_VQA else {}


def test_vqa_pipeline_with_model_object_and_folder(tmp_path, processor, image):
    torch.manual_seed(0)
    model = MPLUGForQuestionAnswering(tiny_config()).eval()
    vqa = pipeline(
        "visual-question-answering",
        model=model,
        tokenizer=processor.tokenizer,
        image_processor=processor.image_processor,
        **VQA_CLASS,
    )
    assert isinstance(vqa, MPLUGVisualQuestionAnsweringPipeline)
    result = vqa(image, "what is the color of the cat", top_k=2, max_new_tokens=3)
    assert len(result) == 2 and set(result[0]) == {"answer", "score"}
    assert 0 < result[1]["score"] <= result[0]["score"] <= 1
    inputs = processor(images=image, text="what is the color of the cat")
    expected = model.generate(**inputs, max_new_tokens=3)
    assert result[0]["answer"] == processor.decode(expected[0])
    ranked = vqa(image, "what is the cat", candidate_answers=["red", "blue", "two"], top_k=3)
    assert sorted(r["answer"] for r in ranked) == ["blue", "red", "two"]
    assert sum(r["score"] for r in ranked) == pytest.approx(1.0, abs=1e-5)
    folder = saved(tmp_path, model, processor)
    from_folder = pipeline("visual-question-answering", model=folder, **VQA_CLASS)
    assert isinstance(from_folder.model, MPLUGForQuestionAnswering)
    assert from_folder(image, "what is the color of the cat", max_new_tokens=3)[0]["answer"] == result[0]["answer"]
    if NATIVE_VQA:  # transformers' own pipeline drives the model too (answers without scores)
        native = pipeline("visual-question-answering", model=folder, max_new_tokens=3)  # its default (256) > 40
        assert type(native).__module__.startswith("transformers.pipelines")
        assert native(image, "what is the color of the cat")[0]["answer"] == result[0]["answer"]
    else:
        assert isinstance(
            pipeline("vqa", model=model, tokenizer=processor.tokenizer, image_processor=processor.image_processor),
            MPLUGVisualQuestionAnsweringPipeline,
        )
    with pytest.raises(ValueError, match="question"):
        vqa(image)


def test_captioning_pipeline(tmp_path, processor, image):
    torch.manual_seed(0)
    model = MPLUGForCaptioning(tiny_config()).eval()
    folder = saved(tmp_path, model, processor)
    captioner = pipeline("image-captioning", model=folder)
    assert isinstance(captioner, MPLUGImageCaptioningPipeline)
    caption = captioner(image, num_beams=2, min_new_tokens=2, max_new_tokens=4)
    expected = model.generate(**processor(images=image), num_beams=2, min_new_tokens=2, max_new_tokens=4)
    assert caption == [{"generated_text": processor.decode(expected[0])}]
    prompted = captioner(images=image, text="a cat", num_beams=1, min_new_tokens=1, max_new_tokens=2)
    assert prompted[0]["generated_text"].startswith("a cat")
    direct = pipeline("image-captioning", model=model, processor=processor)
    assert direct(image, num_beams=2, min_new_tokens=2, max_new_tokens=4) == caption
    # transformers' own image-text-to-text pipeline drives the captioner with a prompt
    native = pipeline("image-text-to-text", model=folder)
    assert type(native).__module__.startswith("transformers.pipelines")
    settings = dict(num_beams=1, min_new_tokens=1, max_new_tokens=2)
    assert (
        native(images=image, text="a cat", generate_kwargs=settings)[0]["generated_text"]
        == prompted[0]["generated_text"]
    )


def test_zero_shot_pipeline(tmp_path, processor, image):
    torch.manual_seed(0)
    model = MPLUGForRetrieval(tiny_config(projection_dim=16)).eval()
    folder = saved(tmp_path, model, processor)
    labels = ["cat", "dog", "two cat"]
    texts = processor.encode_text([f"a picture of {label}." for label in labels])
    with torch.no_grad():
        sims = (
            model.get_image_features(**processor(images=image)).pooler_output
            @ model.get_text_features(**texts).pooler_output.t()
        )
    expected = dict(zip(labels, (sims[0] / model.temp).softmax(-1).tolist()))
    native = pipeline("zero-shot-image-classification", model=folder)  # transformers' own class
    assert type(native) is transformers.ZeroShotImageClassificationPipeline
    result = native(image, candidate_labels=labels, hypothesis_template="a picture of {}.")
    assert {r["label"]: r["score"] for r in result} == pytest.approx(expected, abs=1e-5)
    classifier = pipeline(
        "zero-shot-image-classification", model=folder, pipeline_class=MPLUGZeroShotImageClassificationPipeline
    )
    result = classifier(image, candidate_labels=labels)
    assert {r["label"]: r["score"] for r in result} == pytest.approx(expected, abs=1e-5)
    itm = classifier(image, candidate_labels=["cat", "dog"], use_itm=True)
    assert len(itm) == 2 and sum(r["score"] for r in itm) == pytest.approx(1.0, abs=1e-5)


def test_grounding_pipeline(tmp_path, processor, image):
    torch.manual_seed(0)
    model = MPLUGForGrounding(tiny_config(**GROUNDING)).eval()
    grounding_processor = MPLUGProcessor(
        processor.image_processor, processor.tokenizer, coordinate_start_token="[unused20]", num_coordinate_bins=33
    )
    grounder = pipeline("visual-grounding", model=saved(tmp_path, model, grounding_processor))
    assert isinstance(grounder, MPLUGVisualGroundingPipeline)
    result = grounder(image, "the cat")
    box = result["box"]
    assert 0 <= box["xmin"] <= box["xmax"] <= 50 and 0 <= box["ymin"] <= box["ymax"] <= 40
    batch = grounding_processor.prepare_grounding(image, "the cat")
    prediction = model.predict_boxes(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
    expected = grounding_processor.post_process_grounding(prediction, batch["image_geometry"])[0]
    assert list(box.values()) == pytest.approx(expected["box"]) and result["score"] == pytest.approx(expected["score"])
    assert len(grounder([image, image], ["the cat", "a dog"])) == 2


def test_other_models_keep_the_native_pipeline(processor, image):
    config = CLIPConfig(
        text_config=dict(
            vocab_size=128,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=40,
        ),
        vision_config=OTHER_MODEL_VISION,
        projection_dim=16,
    )
    classifier = pipeline(
        "zero-shot-image-classification",
        model=CLIPModel(config).eval(),
        tokenizer=processor.tokenizer,
        image_processor=processor.image_processor,
    )
    assert not isinstance(classifier, MPLUGZeroShotImageClassificationPipeline)
    assert type(classifier).__module__.startswith("transformers.pipelines")
    result = classifier(image, candidate_labels=["cat", "dog"])
    assert sum(r["score"] for r in result) == pytest.approx(1.0, abs=1e-5)


def test_wrong_mplug_head_for_a_task_is_rejected(processor):
    with pytest.raises(TypeError, match="MPLUGForQuestionAnswering"):
        pipeline(
            "visual-question-answering",
            model=MPLUGForCaptioning(tiny_config()),
            tokenizer=processor.tokenizer,
            image_processor=processor.image_processor,
            **VQA_CLASS,
        )


@pytest.mark.skipif(NATIVE_VQA, reason="transformers has its own visual-question-answering pipeline here")
def test_other_models_still_get_transformers_removal_notice_for_vqa(processor):
    from transformers import BlipConfig, BlipForQuestionAnswering

    config = BlipConfig(
        text_config=dict(
            vocab_size=128, hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2
        ),
        vision_config=OTHER_MODEL_VISION,
    )
    with pytest.raises(
        TypeError, match="BlipForQuestionAnswering.*transformers removed the 'visual-question-answering'"
    ):
        pipeline(
            "visual-question-answering",
            model=BlipForQuestionAnswering(config),
            tokenizer=processor.tokenizer,
            image_processor=processor.image_processor,
        )


def test_importing_the_package_leaves_transformers_pipelines_as_they_were():
    script = """
import json, transformers
from transformers import pipelines
from transformers.pipelines import PIPELINE_REGISTRY
REMOVED_TASKS = getattr(pipelines, "REMOVED_TASKS", {})
before = {task: (entry["impl"], tuple(entry.get("pt", ()))) for task, entry in PIPELINE_REGISTRY.supported_tasks.items()}
aliases, removed = dict(PIPELINE_REGISTRY.task_aliases), dict(REMOVED_TASKS)
import transformers_mplug
after = PIPELINE_REGISTRY.supported_tasks
changed = [task for task, (impl, pt) in before.items() if after[task]["impl"] is not impl or tuple(after[task].get("pt", ())) != pt]
print(json.dumps({
    "changed": changed,
    "added": sorted(set(after) - set(before)),
    "aliases_changed": [a for a, t in aliases.items() if PIPELINE_REGISTRY.task_aliases.get(a) != t],
    "aliases_added": sorted(set(PIPELINE_REGISTRY.task_aliases) - set(aliases)),
    "removed_lifted": sorted(set(removed) - set(REMOVED_TASKS)),
    "native_vqa": "visual-question-answering" in before,
}))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["changed"] == [] and report["aliases_changed"] == []
    if report["native_vqa"]:
        assert report["added"] == ["image-captioning", "visual-grounding"]
        assert report["aliases_added"] == [] and report["removed_lifted"] == []
    else:  # transformers >= 5.3: the removed task comes back for mPLUG models only
        assert report["added"] == ["image-captioning", "visual-grounding", "visual-question-answering"]
        assert report["aliases_added"] == ["vqa"] and report["removed_lifted"] == ["visual-question-answering", "vqa"]


@pytest.mark.skipif(transformers.__version__.startswith("5.2."), reason="already running on transformers 5.2.x")
def test_pipelines_on_transformers_5_2(tmp_path):
    if not os.path.isdir(os.path.join(TF52_PATH, "transformers")):
        pytest.skip(f"transformers 5.2.x not installed at {TF52_PATH} (run `make test`, which installs it)")
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([TF52_PATH, os.environ.get("PYTHONPATH", "")]),
        HF_HUB_OFFLINE="1",
        HF_HOME=str(tmp_path / "hf_home"),
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/test_pipelines.py",
            "-k",
            "not transformers_5_2",
        ],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "passed" in result.stdout
    version = subprocess.run(
        [sys.executable, "-c", "import transformers; print(transformers.__version__)"],
        env=env,
        capture_output=True,
        text=True,
    ).stdout.strip()
    assert version.startswith("5.2."), version


# ------------------------------------------------------------------------------------------------ pipeline tester
def _grounding_processor(processor):
    return MPLUGProcessor(
        processor.image_processor, processor.tokenizer, coordinate_start_token="[unused20]", num_coordinate_bins=33
    )


PIPELINE_CASES = {
    "visual-question-answering": (
        MPLUGForQuestionAnswering,
        {},
        lambda pipe, image: pipe(image, "what is the cat", max_new_tokens=3, num_beams=2),
        lambda pipe, images: pipe(images, ["what is the cat", "how many dogs"], max_new_tokens=3, num_beams=2),
    ),
    "image-captioning": (
        MPLUGForCaptioning,
        {},
        lambda pipe, image: pipe(image, num_beams=2, min_new_tokens=1, max_new_tokens=3),
        lambda pipe, images: pipe(images, num_beams=2, min_new_tokens=1, max_new_tokens=3),
    ),
    "visual-grounding": (
        MPLUGForGrounding,
        GROUNDING,
        lambda pipe, image: pipe(image, "the cat"),
        lambda pipe, images: pipe(images, ["the cat", "a dog"]),
    ),
    "zero-shot-image-classification": (
        MPLUGForRetrieval,
        {"projection_dim": 16},
        lambda pipe, image: pipe(image, candidate_labels=["cat", "dog"]),
        lambda pipe, images: pipe(images, candidate_labels=["cat", "dog"]),
    ),
}


@pytest.mark.parametrize("task", sorted(PIPELINE_CASES))
def test_pipeline_conventions(task, tmp_path, processor, image):
    """For every mPLUG pipeline: the model object, its saved folder and the pipeline's own saved folder give the same
    result, and a list of inputs gives the list of the single results."""
    head, overrides, single, several = PIPELINE_CASES[task]
    kwargs = dict(VQA_CLASS) if task == "visual-question-answering" else {}
    task_processor = _grounding_processor(processor) if task == "visual-grounding" else processor
    torch.manual_seed(0)
    model = head(tiny_config(**overrides)).eval()
    if task == "image-captioning":  # a processor-loading pipeline
        from_object = pipeline(task, model=model, processor=task_processor)
    else:
        components = dict(tokenizer=task_processor.tokenizer, image_processor=task_processor.image_processor)
        from_object = pipeline(task, model=model, **components, **kwargs)
    folder = saved(tmp_path, model, task_processor)
    from_folder = pipeline(task, model=folder, **kwargs)
    expected = single(from_object, image)
    _assert_same_result(single(from_folder, image), expected)
    # transformers 5.2's own pipelines fail in save_pretrained (no `modelcard` attribute): not an mPLUG matter
    if not (transformers.__version__.startswith("5.2.") and task == "zero-shot-image-classification"):
        from_folder.save_pretrained(tmp_path / "pipeline")
        _assert_same_result(single(pipeline(task, model=str(tmp_path / "pipeline"), **kwargs), image), expected)
    other = Image.fromarray(np.random.default_rng(1).integers(0, 256, (30, 44, 3), dtype=np.uint8))
    results = several(from_folder, [image, other])
    assert isinstance(results, list) and len(results) == 2
    _assert_same_result(results[0], single(from_folder, image))


def _assert_same_result(got, expected):
    """Equal pipeline outputs: the same structure, labels and boxes, scores to float rounding (a reloaded model's
    kernels may round the last bits of a ~1e-6 probability differently)."""
    assert type(got) is type(expected), (got, expected)
    if isinstance(expected, dict):
        assert sorted(got) == sorted(expected)
        for key in expected:
            _assert_same_result(got[key], expected[key])
    elif isinstance(expected, list):
        assert len(got) == len(expected)
        for a, b in zip(got, expected):
            _assert_same_result(a, b)
    elif isinstance(expected, float):
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-12)
    else:
        assert got == expected


# ------------------------------------------------------------------------------------------------ batching
BATCH_QUESTIONS = [
    "what is the cat",
    "how many dogs are sitting on the red sofa near the window",
    "is it",
    "what colour is the large square in the top left corner",
    "where",
]


def _batched_and_single(vqa, images, questions, **kwargs):
    batched = vqa(images, questions, batch_size=3, **kwargs)
    single = [vqa(i, q, **kwargs) for i, q in zip(images, questions)]
    return batched, single


def _assert_same_answers(batched, single):
    assert len(batched) == len(single)
    for got, expected in zip(batched, single):
        assert [r["answer"] for r in got] == [r["answer"] for r in expected]
        # relative: a tiny random model gives answers of probability ~1e-6, and its text changes them by ~1e-4
        assert [r["score"] for r in got] == pytest.approx([r["score"] for r in expected], rel=1e-5)


@pytest.mark.parametrize(
    "case",
    [
        dict(decoding_mode="original", num_beams=3, top_k=2, max_new_tokens=4),
        dict(decoding_mode="transformers", num_beams=3, top_k=3, max_new_tokens=4),
        dict(decoding_mode="transformers", num_beams=1, max_new_tokens=4),
        dict(candidate_answers=["red", "blue cat", "two", "on the sofa"], k=3, top_k=2),
    ],
    ids=["original-beams", "transformers-beams", "greedy", "candidates"],
)
def test_vqa_pipeline_batches_equal_one_by_one(case, processor):
    """`batch_size=3` over 5 questions of different lengths (a short last batch): one `generate` per batch, padding
    masked, with the answers and scores of one call per question."""
    torch.manual_seed(0)
    model = MPLUGForQuestionAnswering(tiny_config()).eval()
    vqa = pipeline("visual-question-answering", model=model, processor=processor, **VQA_CLASS)
    rng = np.random.default_rng(3)
    images = [Image.fromarray(rng.integers(0, 256, (32 + 4 * i, 40, 3), dtype=np.uint8)) for i in range(5)]
    calls = []
    generate = model.generate
    model.generate = lambda *a, **kw: calls.append(kw["input_ids"].shape[0]) or generate(*a, **kw)
    ranked = []
    rank_answers = model.rank_answers
    model.rank_answers = lambda *a, **kw: ranked.append(kw["input_ids"].shape[0]) or rank_answers(*a, **kw)
    batched, single = _batched_and_single(vqa, images, BATCH_QUESTIONS, **case)
    assert (calls or ranked) == [3, 2] + [1] * 5  # the batched calls, then the one-by-one ones
    _assert_same_answers(batched, single)


def test_vqa_pipeline_batching_honours_padding_side_and_fixed_length(processor):
    """A tokenizer that pads on the left (the batch is collated with it) and ModelScope's fixed-length padding
    (`padding="max_length"`, 25) give the one-by-one answers too; one image with many questions broadcasts."""
    torch.manual_seed(0)
    model = MPLUGForQuestionAnswering(tiny_config()).eval()
    image = Image.fromarray(np.random.default_rng(4).integers(0, 256, (36, 36, 3), dtype=np.uint8))
    left = MPLUGProcessor(processor.image_processor, copy.deepcopy(processor.tokenizer))
    left.tokenizer.padding_side = "left"
    fixed = MPLUGProcessor(
        processor.image_processor,
        processor.tokenizer,
        default_text_kwargs={"padding": "max_length", "max_length": 25, "truncation": True},
    )
    reference = [
        pipeline("visual-question-answering", model=model, processor=processor, **VQA_CLASS)(
            image, q, num_beams=2, max_new_tokens=4
        )
        for q in BATCH_QUESTIONS
    ]
    encoded = []
    encode_image = model.mplug.encode_image
    model.mplug.encode_image = lambda pixel_values, *a, **kw: (
        encoded.append(len(pixel_values)) or encode_image(pixel_values, *a, **kw)
    )
    for variant in (left, fixed):
        vqa = pipeline("visual-question-answering", model=model, processor=variant, **VQA_CLASS)
        batched = vqa(image, BATCH_QUESTIONS, batch_size=4, num_beams=2, max_new_tokens=4)
        _assert_same_answers(batched, reference)
    assert encoded == [1, 1] * 2  # the image once per batch (5 questions: batches of 4 and 1)
    rows = [{"image": image, "question": q} for q in BATCH_QUESTIONS]
    _assert_same_answers(vqa(rows, batch_size=2, num_beams=2, max_new_tokens=4), reference)
    with pytest.raises(ValueError, match="same length"):
        vqa([image, image], BATCH_QUESTIONS)
    with pytest.raises(TypeError, match="question"):
        vqa(image, [1, 2])
