"""ModelScope mPLUG folders: converted by conversion/convert_mplug_original_to_hf.py as a user runs it, then checked
against the outputs ModelScope's own code recorded (../shared/reference/modelscope)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from transformers_mplug import MPLUGForCaptioning, MPLUGForQuestionAnswering, MPLUGForRetrieval, MPLUGProcessor
from transformers_mplug.original_checkpoint import read_modelscope_folder

from .conftest import REPO_ROOT, require_reference
from .fixture_checks import TOL, assert_beam_equal, beam_outputs
from .test_conversion import run_converter

SCRIPT = REPO_ROOT / "conversion" / "convert_mplug_original_to_hf.py"
VARIANTS = ["vqa_base", "vqa_large", "caption_base", "caption_large", "retrieval_large", "vqa_base_ckpt_model_dict"]
CLASSES = {"vqa": MPLUGForQuestionAnswering, "caption": MPLUGForCaptioning, "retrieval": MPLUGForRetrieval}


def modelscope_dir(variant: str | None = None) -> Path:
    root = require_reference("modelscope")
    return root if variant is None else root / variant


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """variant -> the folder the converter wrote (with --verify), converted once per test module."""
    folders = {}

    def get(variant: str) -> Path:
        if variant not in folders:
            out = tmp_path_factory.mktemp(variant)
            result = run_converter(
                "--checkpoint_path", str(modelscope_dir(variant) / "model"), "--output_dir", str(out), "--verify"
            )
            assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
            assert "| yes |" in result.stdout and "| NO |" not in result.stdout
            folders[variant] = out
        return folders[variant]

    return get


def _load(variant: str):
    folder = modelscope_dir(variant)
    return (
        torch.load(folder / "inputs.pt", weights_only=True),
        torch.load(folder / "outputs.pt", weights_only=True),
        json.loads((folder / "meta.json").read_text()),
    )


def _recorded(ref: dict, name: str) -> dict:
    return {"ids": ref[f"{name}_ids"], "lengths": ref[f"{name}_lengths"], "scores": ref[f"{name}_scores"]}


def assert_trunk_as_modelscope(trunk, ref: dict) -> None:
    """The vision tower, image embeddings and, where recorded and run, the text encoder and the fusion."""
    pairs = {
        "vision_tower_output": trunk.vision_last_hidden_state,
        "image_embeds": trunk.image_embeds,
        "text_encoder_output": trunk.text_embeds,
        "fusion_image_output": trunk.fused_image_embeds,
        "fusion_text_output": trunk.fused_text_embeds,
    }
    checked = [name for name, ours in pairs.items() if ours is not None and name in ref]
    assert {"vision_tower_output", "image_embeds"} <= set(checked)
    for name in checked:
        torch.testing.assert_close(pairs[name], ref[name], **TOL)


def assert_decodes_as_modelscope(model, inputs: dict, ref: dict) -> None:
    """The folder's default decoding (ModelScope's beam search), greedy and the n-best list: ids and scores."""
    for name, options in (
        ("generated_beam", {}),
        ("generated_greedy", {"num_beams": 1}),
        ("beam_nbest", {"num_return_sequences": 5}),
    ):
        assert_beam_equal(beam_outputs(model, **inputs, **options), _recorded(ref, name))


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_processor_gives_modelscope_inputs(converted, variant):
    inputs, _, meta = _load(variant)
    processor = MPLUGProcessor.from_pretrained(converted(variant))
    images = [Image.open(modelscope_dir(variant) / path).convert("RGB") for path in meta["raw_inputs"]["images"]]
    task = meta["task"]
    texts = meta["raw_inputs"]["texts"] if task != "image-captioning" else None
    batch = processor(images=images, text=texts)
    torch.testing.assert_close(batch["pixel_values"], inputs["image"], atol=1e-6, rtol=0)
    if texts is not None:  # `[CLS] text [SEP]`, lower-cased, padded to 25
        assert torch.equal(batch["input_ids"], inputs["question_input_ids"])
        assert torch.equal(batch["attention_mask"], inputs["question_attention_mask"])
    if "answer_input_ids" in inputs:  # answers as ModelScope's train-mode preprocessor: no extra [SEP]
        targets = processor(text_target=meta["raw_inputs"]["answers_or_captions"])
        expected = inputs["answer_input_ids"].masked_fill(inputs["answer_attention_mask"] == 0, -100)
        assert torch.equal(targets["labels"], expected)
    # the AliceMind contract stays the default of processors built otherwise
    plain = MPLUGProcessor.from_vocab_file(modelscope_dir(variant) / "model" / "vocab.txt", image_size=32)
    assert plain(text="what is it")["input_ids"][0, -1].item() != processor.tokenizer.sep_token_id


@pytest.mark.parametrize("variant", ["vqa_base", "vqa_large", "vqa_base_ckpt_model_dict"])
def test_vqa_folder_reproduces_modelscope(converted, variant):
    inputs, ref, _ = _load(variant)
    model = MPLUGForQuestionAnswering.from_pretrained(converted(variant)).eval()
    question = dict(
        pixel_values=inputs["image"],
        input_ids=inputs["question_input_ids"],
        attention_mask=inputs["question_attention_mask"],
    )
    with torch.no_grad():
        trunk = model.mplug(**question)
        out = model(
            **question,
            decoder_input_ids=inputs["answer_input_ids"],
            decoder_attention_mask=inputs["answer_attention_mask"],
            labels=inputs["answer_input_ids"].masked_fill(inputs["answer_attention_mask"] == 0, -100),
        )
    assert_trunk_as_modelscope(trunk, ref)
    torch.testing.assert_close(trunk.last_hidden_state, ref["decoder_encoder_states"], **TOL)
    assert torch.equal(trunk.memory_attention_mask, ref["decoder_encoder_mask"])
    torch.testing.assert_close(out.logits, ref["decoder_logits"], **TOL)
    torch.testing.assert_close(out.loss_per_sequence, ref["decoder_loss_per_sample"], **TOL)
    torch.testing.assert_close(out.loss, ref["loss"], **TOL)
    # the folder's default decoding is ModelScope's (the original beam search, the yaml's beam size and lengths)
    assert_decodes_as_modelscope(model, question, ref)


@pytest.mark.parametrize("variant", ["caption_base", "caption_large"])
def test_caption_folder_reproduces_modelscope(converted, variant):
    inputs, ref, _ = _load(variant)
    model = MPLUGForCaptioning.from_pretrained(converted(variant)).eval()
    ids, mask = inputs["answer_input_ids"], inputs["answer_attention_mask"]
    with torch.no_grad():
        trunk = model.mplug(pixel_values=inputs["image"])
        out = model(
            pixel_values=inputs["image"], input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)
        )
    assert_trunk_as_modelscope(trunk, ref)
    torch.testing.assert_close(out.logits, ref["decoder_logits"], **TOL)
    torch.testing.assert_close(out.loss, ref["loss"], **TOL)
    pixels = {"pixel_values": inputs["image"]}
    assert_decodes_as_modelscope(model, pixels, ref)


def test_retrieval_folder_reproduces_modelscope(converted):
    inputs, ref, _ = _load("retrieval_large")
    model = MPLUGForRetrieval.from_pretrained(converted("retrieval_large")).eval()
    pixels, ids, mask = inputs["image"], inputs["question_input_ids"], inputs["question_attention_mask"]
    with torch.no_grad():
        trunk = model.mplug(pixel_values=pixels, input_ids=ids, attention_mask=mask)
        logits = model(pixel_values=pixels, input_ids=ids, attention_mask=mask)
        itm = model(pixel_values=pixels, input_ids=ids, attention_mask=mask, use_itm_head=True).itm_logits
        images, texts = pixels.repeat_interleave(2, 0), ids.repeat(2, 1)
        all_pairs = model.match_pairs(images, texts, mask.repeat(2, 1)).view(2, 2, 2)
        result = model.retrieve(pixel_values=pixels, input_ids=ids, attention_mask=mask, k=2)
    assert_trunk_as_modelscope(trunk, ref)
    torch.testing.assert_close(logits.image_features, ref["itc_image_feat"], **TOL)
    torch.testing.assert_close(logits.text_features, ref["itc_text_feat"], **TOL)
    torch.testing.assert_close(logits.logits_per_image, ref["itc_sim_i2t"], **TOL)
    torch.testing.assert_close(logits.logits_per_text, ref["itc_sim_t2i"], **TOL)
    torch.testing.assert_close(itm, ref["itm_logits"], **TOL)
    torch.testing.assert_close(itm.softmax(-1), ref["itm_scores"], **TOL)
    torch.testing.assert_close(itm.softmax(-1), ref["eval_forward_scores"], **TOL)
    torch.testing.assert_close(all_pairs, ref["itm_logits_all_pairs"], **TOL)
    # the corpus ranking scores every pair by its ITM match logit (the original evaluation's score)
    expected = ref["itm_logits_all_pairs"][..., 1].argsort(dim=1, descending=True)
    assert torch.equal(result.image_to_text_indices, expected)


def test_the_modelscope_folder_is_read_strictly(tmp_path):
    source = modelscope_dir("vqa_base") / "model"
    folder = read_modelscope_folder(source)
    assert folder.task == "vqa" and not any(key.startswith("model.") for key in folder.state_dict)
    assert folder.bert_config["fusion_layers"] == 2 and folder.task_config["beam_size"] == 5

    def broken(name: str, change) -> Path:
        target = tmp_path / name
        shutil.copytree(source, target)
        change(target)
        return target

    def set_json(path: Path, **values) -> None:
        data = json.loads(path.read_text())
        data.update(values)
        path.write_text(json.dumps(data))

    cases = [
        (broken("no_vocab", lambda d: (d / "vocab.txt").unlink()), "lacks `vocab.txt`"),
        (broken("no_weights", lambda d: (d / "pytorch_model.bin").unlink()), "lacks `pytorch_model.bin`"),
        (broken("no_bert", lambda d: (d / "config_bert.json").unlink()), "lacks `config_bert.json`"),
        (
            broken("task", lambda d: set_json(d / "configuration.json", task="text-to-image-synthesis")),
            "task 'text-to-image-synthesis'",
        ),
        (broken("type", lambda d: set_json(d / "configuration.json", model={"type": "ofa"})), "model type 'ofa'"),
        (
            broken(
                "width",
                lambda d: (d / "config.yaml").write_text(
                    (d / "config.yaml").read_text().replace("clip_vision_layers: 2", "clip_vision_layers: 12")
                ),
            ),
            "clip_vision_layers=12 but the weights have 2",
        ),
    ]
    for path, message in cases:
        with pytest.raises(ValueError, match=message):
            read_modelscope_folder(path)
        out = tmp_path / f"out_{path.name}"
        result = run_converter("--checkpoint_path", str(path), "--output_dir", str(out))
        assert result.returncode == 1 and message.split("`")[0] in result.stderr, result.stderr
        assert not out.exists()  # nothing written


def test_the_converter_refuses_foreign_keys_and_contradicting_arguments(tmp_path):
    source = modelscope_dir("vqa_base") / "model"
    target = tmp_path / "foreign"
    shutil.copytree(source, target)
    state = torch.load(target / "pytorch_model.bin", weights_only=True)
    state["model.image_decoder.layer.0.weight"] = torch.zeros(2)
    torch.save(state, target / "pytorch_model.bin")
    out = tmp_path / "out"
    result = run_converter("--checkpoint_path", str(target), "--output_dir", str(out))
    assert result.returncode == 1 and "image_decoder.layer.0.weight" in result.stderr and not out.exists()
    result = run_converter("--checkpoint_path", str(source), "--task", "caption", "--output_dir", str(out))
    assert result.returncode == 1 and "visual-question-answering" in result.stderr and not out.exists()
    result = run_converter(
        "--checkpoint_path", str(source), "--vocab_path", str(source / "vocab.txt"), "--output_dir", str(out)
    )
    assert result.returncode == 1 and "read from the ModelScope folder" in result.stderr and not out.exists()
    # a wrong shape against the configs
    state = torch.load(source / "pytorch_model.bin", weights_only=True)
    key = "model.text_encoder.encoder.layer.0.attention.self.query.weight"
    state[key] = state[key][:, :-1]
    shutil.copytree(source, tmp_path / "shape")
    torch.save(state, tmp_path / "shape" / "pytorch_model.bin")
    result = run_converter("--checkpoint_path", str(tmp_path / "shape"), "--output_dir", str(out))
    assert result.returncode == 1 and "text_model.encoder.layer.0.attention.self.query.weight" in result.stderr
    assert not out.exists()


@pytest.mark.parametrize("variant", ["vqa_base", "vqa_large", "caption_base", "caption_large"])
def test_pipelines_on_a_converted_folder_answer_as_modelscope(converted, variant):
    from transformers import pipeline

    _, _, meta = _load(variant)
    image = Image.open(modelscope_dir(variant) / meta["raw_inputs"]["images"][0]).convert("RGB")
    (expected,) = meta["string_outputs"]["pipeline(task, model=Model.from_pretrained(model/))(sample 0)"].values()
    if meta["task"] == "visual-question-answering":
        answerer = pipeline("visual-question-answering", model=str(converted(variant)))
        result = answerer(image=image, question=meta["raw_inputs"]["texts"][0])
        assert result[0]["answer"] == expected
    else:
        captioner = pipeline("image-captioning", model=str(converted(variant)))
        assert captioner(image)[0]["generated_text"] == expected
