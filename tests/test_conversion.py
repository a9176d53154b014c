"""conversion/convert_mplug_original_to_hf.py, run as a user runs it, on every original-format fixture."""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from transformers_mplug import (
    MPLUGForCaptioning,
    MPLUGForGrounding,
    MPLUGForQuestionAnswering,
    MPLUGForRetrieval,
    MPLUGProcessor,
)
from transformers_mplug.original_checkpoint import bert_config_from_state_dict, resize_position_embedding

from .conftest import REFERENCE_DIR, REPO_ROOT, require_reference
from .fixture_checks import (
    check_caption,
    check_grounding,
    check_retrieval_evaluation,
    check_retrieval_training,
    check_videocap,
    check_videoqa,
    check_vqa,
    load,
)
from .test_auto_and_remote_code import BLOCK_PACKAGE

SCRIPT = REPO_ROOT / "conversion" / "convert_mplug_original_to_hf.py"
BERT = {"base": "configs/config_bert_tiny_base.json", "large": "configs/config_bert_tiny_large.json"}


def convert(out: Path, task: str, checkpoint: str, fixture: str, bert: str, *extra: str, env=None, check=True):
    root = require_reference()
    command = [
        sys.executable,
        str(SCRIPT),
        "--task",
        task,
        "--checkpoint_path",
        str(root / checkpoint),
        "--config_path",
        str(root / fixture / "config.yaml"),
        "--bert_config_path",
        str(root / BERT[bert]),
        "--vocab_path",
        str(root / "configs" / "vocab.txt"),
        "--output_dir",
        str(out),
        *extra,
    ]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    )
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


CASES = [
    ("vqa_base", "vqa", "vqa_base/checkpoint.pth", "base", MPLUGForQuestionAnswering, check_vqa),
    ("vqa_large", "vqa", "vqa_large/checkpoint.pth", "large", MPLUGForQuestionAnswering, check_vqa),
    ("caption_base", "caption", "caption_base/checkpoint.pth", "base", MPLUGForCaptioning, check_caption),
    ("caption_large", "caption", "caption_large/checkpoint.pth", "large", MPLUGForCaptioning, check_caption),
    (
        "retrieval_large",
        "retrieval",
        "retrieval_large/checkpoint.pth",
        "large",
        MPLUGForRetrieval,
        check_retrieval_evaluation,
    ),
    ("grounding_large", "grounding", "grounding_large/checkpoint.pth", "large", MPLUGForGrounding, check_grounding),
    ("videoqa_base", "vqa", "vqa_base/checkpoint.pth", "base", MPLUGForQuestionAnswering, check_videoqa),
    (
        "videocap_large",
        "caption",
        "videocap_large/checkpoint.pth",
        "large",
        MPLUGForCaptioning,
        functools.partial(check_videocap, decoding_from_folder=True),
    ),
]


@pytest.mark.parametrize(
    ("fixture", "task", "checkpoint", "bert", "model_class", "check"), CASES, ids=[case[0] for case in CASES]
)
def test_converted_folder_reproduces_the_original(tmp_path, fixture, task, checkpoint, bert, model_class, check):
    out = tmp_path / fixture
    result = convert(out, task, checkpoint, fixture, bert, "--verify")
    assert "Dropped" in result.stdout and "| yes |" in result.stdout
    expected_files = {"config.json", "model.safetensors", "README.md", "tokenizer_config.json", "processor_config.json"}
    assert expected_files <= set(os.listdir(out))
    model, info = model_class.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    processor = MPLUGProcessor.from_pretrained(out)
    assert processor.image_processor.size["height"] == model.config.vision_config.image_size
    check(model.eval(), require_reference(fixture))
    config = json.loads((out / "config.json").read_text())
    assert isinstance(config["cross_modal_layer_types"], list)
    card = (out / "README.md").read_text()
    assert "sha256" in card and "| yes |" in card and "Licence" in card
    if task in ("vqa", "caption"):
        generation = json.loads((out / "generation_config.json").read_text())
        task_config = (require_reference(fixture) / "config.yaml").read_text()
        assert f"beam_size: {generation['num_beams']}" in task_config
        assert f"max_length: {generation['max_new_tokens']}" in task_config
        assert f"min_length: {generation['min_new_tokens']}" in task_config
        assert generation["decoding_mode"] == "original" and "original mPLUG beam search" in card
        if fixture == "videocap_large":
            reference = load(require_reference(fixture))[1]
            assert generation["decoder_prompt_ids"] == reference["prompt_ids_fed_to_generator"][0].tolist()
        else:
            assert "decoder_prompt_ids" not in generation


def test_retrieval_training_losses_after_conversion(tmp_path):
    out = tmp_path / "retrieval"
    convert(out, "retrieval", "retrieval_large/checkpoint.pth", "retrieval_large", "large")
    model = MPLUGForRetrieval.from_pretrained(out).eval()
    state = torch.load(REFERENCE_DIR / "retrieval_large" / "checkpoint.pth", weights_only=True)["model"]
    queues = {k: state[k] for k in ("image_queue", "text_queue", "idx_queue")}
    check_retrieval_training(model, require_reference("retrieval_large"), queues)


def test_bf16_deepspeed_file_converts(tmp_path):
    out = tmp_path / "from_deepspeed"
    convert(out, "vqa", "vqa_base/deepspeed_ckpt/0.pt/mp_rank_00_model_states.pt", "vqa_base", "base", "--verify")
    model = MPLUGForQuestionAnswering.from_pretrained(out, dtype=torch.float32).eval()
    check_vqa(model, require_reference("vqa_base"), ref_key="from_bf16_checkpoint")


def test_bfloat16_output_dtype(tmp_path):
    out = tmp_path / "bf16"
    convert(out, "vqa", "vqa_large/checkpoint.pth", "vqa_large", "large", "--dtype", "bfloat16", "--verify")
    weights = load_file(out / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    model = MPLUGForQuestionAnswering.from_pretrained(out, dtype=torch.float32).eval()
    inputs, ref = load(require_reference("vqa_large"))
    with torch.no_grad():
        trunk = model.mplug(
            pixel_values=inputs["image"],
            input_ids=inputs["question_input_ids"],
            attention_mask=inputs["question_attention_mask"],
        )
    torch.testing.assert_close(trunk.fused_text_embeds, ref["encoders"]["fusion_text_output"], atol=0.1, rtol=0.05)


def test_optimizer_carrying_checkpoint_is_the_caption_fixture():
    checkpoint = torch.load(require_reference("caption_base") / "checkpoint.pth", weights_only=True)
    assert {"model", "optimizer", "lr_scheduler"} <= set(checkpoint)  # converted by the caption_base case above


def _broken_checkpoint(tmp_path: Path, edit) -> str:
    state = torch.load(require_reference("vqa_large") / "checkpoint.pth", weights_only=True)["model"]
    edit(state)
    path = tmp_path / "broken.pth"
    torch.save({"model": state}, path)
    return str(path)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s.pop("text_encoder.encoder.layer.0.output.dense.weight"), "output.dense.weight"),
        (lambda s: s.__setitem__("mystery_module.weight", torch.zeros(2)), "mystery_module.weight"),
        (lambda s: s.__setitem__("visn_fc.bias", torch.zeros(3)), "visn_fc.bias|vision_projection.dense.bias"),
    ],
    ids=["missing-weight", "unknown-key", "wrong-shape"],
)
def test_bad_checkpoints_fail_naming_the_key(tmp_path, edit, message):
    path = _broken_checkpoint(tmp_path, edit)
    root = require_reference()
    result = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--task",
            "vqa",
            "--checkpoint_path",
            path,
            "--config_path",
            str(root / "vqa_large" / "config.yaml"),
            "--bert_config_path",
            str(root / BERT["large"]),
            "--vocab_path",
            str(root / "configs" / "vocab.txt"),
            "--output_dir",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    assert any(m in result.stderr for m in message.split("|")), result.stderr
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "pickled.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "args": argparse.Namespace(lr=1.0)}, path)
    root = require_reference()
    result = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--task",
            "vqa",
            "--checkpoint_path",
            str(path),
            "--vocab_path",
            str(root / "configs" / "vocab.txt"),
            "--output_dir",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1 and "pickled objects" in result.stderr and "weights_only" in result.stderr


def test_position_embedding_resize_matches_the_original():
    folder = require_reference("posembed")
    inputs, outputs = load(folder)
    for case in ("case0", "case1", "case2"):
        resized = resize_position_embedding(inputs["tables"][case], inputs["grid_out"][case])
        torch.testing.assert_close(resized, outputs["vit_resize"][case], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(resized, outputs["visual_transformers_resize"][case][0], atol=1e-6, rtol=1e-6)


def test_converting_for_another_resolution_resizes_the_positions(tmp_path):
    out = tmp_path / "res24"
    convert(out, "vqa", "vqa_base/checkpoint.pth", "vqa_base", "base", "--image_size", "24")
    model = MPLUGForQuestionAnswering.from_pretrained(out)
    assert model.config.vision_config.image_size == 24
    table = model.mplug.vision_model.embeddings.position_embedding.weight
    original = torch.load(REFERENCE_DIR / "vqa_base" / "checkpoint.pth", weights_only=True)["model"]
    expected = resize_position_embedding(original["visual_encoder.visual.positional_embedding"], 3)
    torch.testing.assert_close(table.detach(), expected)
    assert MPLUGProcessor.from_pretrained(out).image_processor.size == {"height": 24, "width": 24}


def test_bert_sizes_read_from_shapes():
    state = torch.load(require_reference("vqa_base") / "checkpoint.pth", weights_only=True)["model"]
    bert = json.loads((REFERENCE_DIR / BERT["base"]).read_text())
    read = bert_config_from_state_dict(state)
    for key in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "max_position_embeddings",
        "text_encoder_layers",
        "text_decode_layers",
    ):
        assert read[key] == bert[key], key


def test_folder_loads_with_remote_code_in_a_fresh_process(tmp_path):
    out = tmp_path / "remote"
    convert(out, "vqa", "vqa_base/checkpoint.pth", "vqa_base", "base")
    inputs = require_reference("vqa_base") / "inputs.pt"
    outputs = require_reference("vqa_base") / "outputs.pt"
    code = BLOCK_PACKAGE + textwrap.dedent(
        f"""
        import torch
        from transformers import AutoModelForVisualQuestionAnswering, AutoProcessor
        model = AutoModelForVisualQuestionAnswering.from_pretrained({str(out)!r}, trust_remote_code=True).eval()
        assert type(model).__name__ == "MPLUGForQuestionAnswering"
        processor = AutoProcessor.from_pretrained({str(out)!r}, trust_remote_code=True)
        inputs = torch.load({str(inputs)!r}, weights_only=True)
        ref = torch.load({str(outputs)!r}, weights_only=True)
        batch = processor(text=inputs["questions"])
        assert torch.equal(batch["input_ids"], inputs["question_input_ids"])
        ranked = model.rank_answers(inputs["answer_list_input_ids"], pixel_values=inputs["image"], k=inputs["rank_k"],
                                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        assert torch.equal(ranked.indices, ref["rank_answer"]["topk_ids"])
        print("ok")
        """
    )
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


def test_push_to_hub_plans_the_upload_and_fails_honestly_offline(tmp_path):
    out = tmp_path / "push"
    dry = convert(
        out,
        "caption",
        "caption_base/checkpoint.pth",
        "caption_base",
        "base",
        "--push_to_hub",
        "someone/mplug-test",
        "--dry_run_push",
    )
    assert "model.safetensors" in dry.stdout and "README.md" in dry.stdout and "nothing was uploaded" in dry.stdout
    offline = convert(
        tmp_path / "push2",
        "caption",
        "caption_base/checkpoint.pth",
        "caption_base",
        "base",
        "--push_to_hub",
        "someone/mplug-test",
        check=False,
    )
    assert offline.returncode == 3 and "upload to someone/mplug-test failed" in offline.stderr
    assert "uploaded to" not in offline.stdout


def _pretrained_layout_checkpoint(tmp_path: Path) -> tuple[str, dict[str, torch.Tensor]]:
    """The vqa_base fixture re-saved in the layout of the released pretraining files (`text_encoder.bert.`,
    `fusion_encoder.fusion.` prefixes), with the pretraining heads (ITC projections, ITM, temperature, an MLM head
    on the text encoder), momentum copies and queues added. The reference folder has no pretraining file of its
    own; the trunk and the decoder must still reproduce the recorded VQA outputs after conversion."""
    state = torch.load(require_reference("vqa_base") / "checkpoint.pth", weights_only=True)["model"]
    generator = torch.Generator().manual_seed(0)
    hidden = state["text_encoder.embeddings.word_embeddings.weight"].shape[1]
    vocab = state["text_encoder.embeddings.word_embeddings.weight"].shape[0]
    out = {}
    for key, value in state.items():
        if key.startswith("text_encoder."):
            key = "text_encoder.bert." + key[len("text_encoder.") :]
        elif key.startswith("fusion_encoder."):
            key = "fusion_encoder.fusion." + key[len("fusion_encoder.") :]
        out[key] = value
    heads = {
        "vision_proj.weight": (16, hidden),
        "vision_proj.bias": (16,),
        "text_proj.weight": (16, hidden),
        "text_proj.bias": (16,),
        "itm_head.weight": (2, hidden),
        "itm_head.bias": (2,),
        "text_encoder.cls.predictions.transform.dense.weight": (hidden, hidden),
        "text_encoder.cls.predictions.transform.dense.bias": (hidden,),
        "text_encoder.cls.predictions.transform.LayerNorm.weight": (hidden,),
        "text_encoder.cls.predictions.transform.LayerNorm.bias": (hidden,),
        "text_encoder.cls.predictions.bias": (vocab,),
    }
    for key, shape in heads.items():
        out[key] = torch.randn(shape, generator=generator) * 0.05
    out["text_encoder.cls.predictions.decoder.weight"] = out["text_encoder.bert.embeddings.word_embeddings.weight"]
    out["text_encoder.cls.predictions.decoder.bias"] = out["text_encoder.cls.predictions.bias"]
    out["temp"] = torch.tensor(0.05)
    out["vision_proj_m.weight"] = out["vision_proj.weight"] + 1.0
    out["image_queue"] = torch.randn(16, 8, generator=generator)
    out["queue_ptr"] = torch.zeros(1, dtype=torch.long)
    path = tmp_path / "mplug_pretrained_layout.pth"
    torch.save({"model": out}, path)
    return str(path), out


def test_pretrained_layout_file_converts_for_pretraining_and_fine_tuning(tmp_path):
    from transformers_mplug import MPLUGForPreTraining

    path, state = _pretrained_layout_checkpoint(tmp_path)
    out = tmp_path / "pretrained"
    root = require_reference()
    result = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--task",
            "pretrained",
            "--checkpoint_path",
            path,
            "--bert_config_path",
            str(root / BERT["base"]),
            "--vocab_path",
            str(root / "configs" / "vocab.txt"),
            "--output_dir",
            str(out),
            "--verify",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "momentum copies" in result.stdout and "| yes |" in result.stdout
    assert "mlm_logits" in result.stdout and "decoder_logits" in result.stdout
    model, info = MPLUGForPreTraining.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    # heads placed, teacher = student (not the original momentum copy), queues empty
    torch.testing.assert_close(model.vision_proj.weight, state["vision_proj.weight"], atol=0, rtol=0)
    torch.testing.assert_close(model.temp, torch.tensor([0.05]), atol=0, rtol=0)
    torch.testing.assert_close(
        model.mlm_head.predictions.transform.dense.weight,
        state["text_encoder.cls.predictions.transform.dense.weight"],
        atol=0,
        rtol=0,
    )
    assert all(torch.equal(t, s) for _, t, s in model.momentum_parameter_pairs())
    assert int(model.queue_ptr) == 0 and bool((model.idx_queue == -100).all())
    card = (out / "README.md").read_text()
    assert "MPLUGForPreTraining" in card and "sha256" in card
    # the same weights as the VQA fixture: fine-tuning starts from exactly the original trunk and decoder
    qa = MPLUGForQuestionAnswering.from_pretrained(out).eval()
    check_vqa(qa, require_reference("vqa_base"))
    # against the recorded outputs, through the VQA head
    again = convert(
        tmp_path / "again",
        "pretrained",
        path,
        "vqa_base",
        "base",
        "--verify",
        "--reference_dir",
        str(root / "vqa_base"),
    )
    assert "teacher_forced.logits" in again.stdout and "| NO |" not in again.stdout


def run_converter(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


@pytest.mark.parametrize("task", ["caption", "grounding", "retrieval"])
def test_a_checkpoint_converted_as_another_task_is_refused(tmp_path, task):
    root = require_reference()
    result = convert(tmp_path / "out", task, "vqa_base/checkpoint.pth", "vqa_base", "base", "--verify", check=False)
    assert result.returncode == 1, result.stdout[-2000:]
    assert f"--task {task}` does not match" in result.stderr and "--task vqa" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()
    assert root.exists()


def test_detected_tasks_of_every_fixture():
    from transformers_mplug.original_checkpoint import detect_original_tasks, load_original_checkpoint

    root = require_reference()
    expected = {
        "vqa_base": {"vqa"},
        "vqa_large": {"vqa", "caption"},  # built without momentum copies: the same modules as a captioner
        "caption_base": {"vqa", "caption"},
        "caption_large": {"vqa", "caption"},
        "videocap_large": {"caption"},
        "retrieval_large": {"retrieval"},
        "grounding_large": {"grounding"},
    }
    for fixture, tasks in expected.items():
        assert detect_original_tasks(load_original_checkpoint(root / fixture / "checkpoint.pth"))[0] == tasks, fixture


def test_unreadable_inputs_end_with_one_line_and_the_documented_exit_code(tmp_path):
    root = require_reference()
    vocab = str(root / "configs" / "vocab.txt")
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes((root / "vqa_large" / "checkpoint.pth").read_bytes()[:5000])
    not_a_dict = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], not_a_dict)
    good = str(root / "vqa_large" / "checkpoint.pth")
    bert = ("--bert_config_path", str(root / BERT["large"]))
    cases = [
        (("--checkpoint_path", str(truncated), "--vocab_path", vocab), 1, "cannot be read"),
        (("--checkpoint_path", str(not_a_dict), "--vocab_path", vocab), 1, "must be a dict"),
        (("--checkpoint_path", str(tmp_path), "--vocab_path", vocab), 1, "is a directory"),
        (("--checkpoint_path", good, *bert, "--vocab_path", str(tmp_path / "missing.txt")), 2, "missing.txt"),
        (
            ("--checkpoint_path", good, *bert, "--vocab_path", vocab, "--config_path", str(tmp_path / "missing.yaml")),
            2,
            "missing.yaml",
        ),
    ]
    for args, code, message in cases:
        result = run_converter("--task", "vqa", *args, "--output_dir", str(tmp_path / "out"))
        assert result.returncode == code, (args, result.stderr[-2000:])
        lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and message in lines[0], (args, result.stderr[-2000:])
        assert "Traceback" not in result.stderr


def test_the_converter_never_reads_the_weights_it_drops(tmp_path):
    """The model takes the checkpoint's tensors without a copy, and the dropped ones (here replaced by meta tensors,
    whose data cannot be read) are never touched: what keeps the converter's memory below the file's size."""
    sys.path.insert(0, str(SCRIPT.parent))
    import convert_mplug_original_to_hf as converter

    root = require_reference()
    state = torch.load(root / "vqa_base" / "checkpoint.pth", weights_only=True)["model"]
    dropped_prefixes = ("visual_encoder_m.", "text_encoder_m.", "fusion_encoder_m.", "text_decoder_m.")
    dropped_text_tower = ("visual_encoder.transformer.", "visual_encoder.token_embedding.")
    for key in list(state):
        if key.startswith(dropped_prefixes + dropped_text_tower):
            state[key] = torch.empty_like(state[key], device="meta")
    args = converter.parse_args(
        ["--task", "vqa", "--checkpoint_path", "unused.pth", "--vocab_path", "unused.txt", "--output_dir", "unused"]
    )
    args.bert_config_path = str(root / BERT["base"])
    task_config = converter.read_task_config(str(root / "vqa_base" / "config.yaml"))
    model, mapping = converter.build(args, state, task_config)
    assert len(mapping.dropped["training-only state (momentum copies, queues)"]) > 0
    assert not any(p.is_meta for p in model.parameters()) and not any(b.is_meta for b in model.buffers())
    # the weights are the checkpoint's own tensors (no copy) ...
    key = "text_encoder.encoder.layer.0.attention.self.query.weight"
    assert model.mplug.text_model.encoder.layer[0].attention.self.query.weight.data_ptr() == state[key].data_ptr()
    # ... tied as transformers ties them, and the folder reproduces the original outputs
    decoder = model.text_decoder
    assert decoder.cls.predictions.decoder.weight is decoder.bert.embeddings.word_embeddings.weight
    model.save_pretrained(tmp_path / "out")
    check_vqa(MPLUGForQuestionAnswering.from_pretrained(tmp_path / "out").eval(), root / "vqa_base")
