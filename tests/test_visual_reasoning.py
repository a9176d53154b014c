"""MPLUGForVisualReasoning (NLVR2): two cross-attentions per co-attention layer, initialisation from single-image
folders, image-pair processing, the embedded pairs and examples/run_nlvr.py."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from PIL import Image

from transformers_mplug import MPLUGForVisualEntailment, MPLUGForVisualReasoning, MPLUGModel, MPLUGProcessor
from transformers_mplug.data import shapes_pair_examples

from .common import MPLUGModelTesterMixin
from .conftest import REPO_ROOT, fit_fixed_batch, tiny_config, tiny_inputs


def pair_inputs(config, batch_size: int = 3, seed: int = 0) -> dict:
    inputs = tiny_inputs(config, batch_size=batch_size, seed=seed, padded=True)
    generator = torch.Generator().manual_seed(seed + 7)
    inputs["pixel_values"] = torch.randn(batch_size, 2, 3, 32, 32, generator=generator)
    return inputs


class TestVisualReasoningCommon(MPLUGModelTesterMixin):
    model_class = MPLUGForVisualReasoning
    recorded_fields = ("vision_hidden_states", "vision_attentions", "text_hidden_states", "text_attentions")

    def make_inputs(self, config, **kwargs):
        kwargs.pop("padded", None)
        return pair_inputs(config, **kwargs)

    def output_tensors(self, output, inputs):
        return {"logits": output.logits, "fused_text_embeds": output.fused_text_embeds}


class TestVisualEntailmentCommon(MPLUGModelTesterMixin):
    model_class = MPLUGForVisualEntailment
    recorded_fields = (
        "vision_hidden_states",
        "vision_attentions",
        "text_hidden_states",
        "text_attentions",
        "fusion_text_hidden_states",
        "fusion_attentions",
        "fusion_cross_attentions",
    )

    def output_tensors(self, output, inputs):
        return {"logits": output.logits, "fused_text_embeds": output.fused_text_embeds}


def test_identical_images_and_cross_attentions_reduce_to_the_single_image_trunk(tmp_path):
    torch.manual_seed(0)
    trunk = MPLUGModel(tiny_config()).eval()
    trunk.save_pretrained(tmp_path)
    model, info = MPLUGForVisualReasoning.from_pretrained(tmp_path, output_loading_info=True)
    model.eval()
    assert not any(k.startswith(("mplug.", "pair_crossattention.")) for k in info["missing_keys"])
    for index, attention in model.pair_crossattention.items():  # initialised from the single cross-attention
        source = model.mplug.cross_modal_encoder.layer[int(index)].crossattention.state_dict()
        assert all(torch.equal(v, source[k]) for k, v in attention.state_dict().items())
    inputs = pair_inputs(model.config)
    same = inputs["pixel_values"][:, :1].expand(-1, 2, -1, -1, -1).contiguous()
    with torch.no_grad():
        out = model(pixel_values=same, input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        single = trunk(
            pixel_values=same[:, 0], input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
        ).fused_text_embeds
    valid = inputs["attention_mask"][..., None].bool()
    torch.testing.assert_close(out.fused_text_embeds * valid, single * valid, atol=1e-5, rtol=1e-4)


def test_both_images_matter_and_batched_equals_one_by_one():
    torch.manual_seed(0)
    model = MPLUGForVisualReasoning(tiny_config()).eval()
    inputs = pair_inputs(model.config)
    with torch.no_grad():
        out = model(**inputs, labels=torch.tensor([1, 0, 1]))
        swapped_second = dict(inputs, pixel_values=torch.stack([inputs["pixel_values"][:, 0]] * 2, dim=1))
        assert not torch.allclose(model(**swapped_second).logits, out.logits)
        for row in range(3):
            keep = int(inputs["attention_mask"][row].sum())
            alone = model(
                pixel_values=inputs["pixel_values"][row : row + 1], input_ids=inputs["input_ids"][row : row + 1, :keep]
            )
            torch.testing.assert_close(alone.logits[0], out.logits[row], atol=1e-5, rtol=1e-4)
    assert out.logits.shape == (3, 2)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(out.logits, torch.tensor([1, 0, 1])))


def test_save_load_strict_and_bad_inputs(tmp_path):
    torch.manual_seed(0)
    model = MPLUGForVisualReasoning(tiny_config()).eval()
    model.save_pretrained(tmp_path)
    loaded, info = MPLUGForVisualReasoning.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    inputs = pair_inputs(model.config)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(**inputs).logits, model(**inputs).logits, atol=0, rtol=0)
        with pytest.raises(ValueError, match="two images per example"):
            model(pixel_values=inputs["pixel_values"][:, 0], input_ids=inputs["input_ids"])  # one image
        with pytest.raises(ValueError, match="class ids"):
            model(**inputs, labels=torch.tensor([0, 1, 2]))


def test_processor_encodes_image_pairs_and_rejects_single_images(shapes_processor: MPLUGProcessor):
    a, b = Image.new("RGB", (40, 30), "red"), Image.new("RGB", (20, 50), "blue")
    batch = shapes_processor.encode_image_pairs([(a, b), (b, a)])
    assert tuple(batch["pixel_values"].shape) == (2, 2, 3, 32, 32)
    torch.testing.assert_close(batch["pixel_values"][0, 0], batch["pixel_values"][1, 1])
    with pytest.raises(ValueError, match=r"pairs\[1\]` must hold two images.*got 1"):
        shapes_processor.encode_image_pairs([(a, b), a])
    with pytest.raises(ValueError, match="got 3"):
        shapes_processor.encode_image_pairs([(a, b, a)])


def test_embedded_pairs_are_balanced_and_true_to_their_scenes():
    rows = shapes_pair_examples(200, seed=5, image_size=32)
    assert sum(r["label"] for r in rows) == 100
    again = shapes_pair_examples(200, seed=5, image_size=32)
    assert [r["sentence"] for r in again] == [r["sentence"] for r in rows]
    assert {r["sentence"].split()[0] for r in rows} <= {"the", "both"}


def test_run_nlvr_trains_and_saves(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    args = "--vision_width 32 --vision_layers 1 --text_width 32 --text_layers 1 --cross_modal_layers 2"
    args += " --image_size 32 --patch_size 16 --per_device_train_batch_size 8 --logging_steps 1"
    args += " --num_train_examples 48 --num_eval_examples 12 --max_steps 12 --learning_rate 1e-3 --warmup_steps 0"
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "examples" / "run_nlvr.py"), *args.split(), "--output_dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert 0 <= metrics["eval_accuracy"] <= 1 and "majority_class_accuracy" in metrics
    losses = [float(x) for x in re.findall(r"'loss': '([0-9.]+)'", result.stdout + result.stderr)]
    assert len(losses) == 12 and all(0 < loss < 5 for loss in losses)  # logged every step
    assert MPLUGForVisualReasoning.from_pretrained(tmp_path).config.id2label[1] == "true"


def test_a_few_steps_reduce_the_pair_loss_on_the_embedded_data(shapes_processor: MPLUGProcessor):
    rows = shapes_pair_examples(12, seed=0, image_size=32)
    batch = dict(shapes_processor.encode_image_pairs([(r["left"], r["right"]) for r in rows]))
    batch.update(shapes_processor.encode_text([r["sentence"] for r in rows]))
    labels = torch.tensor([r["label"] for r in rows])
    torch.manual_seed(0)
    config = tiny_config(
        text_config=dict(
            vocab_size=len(shapes_processor.tokenizer),
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
        )
    )
    losses = fit_fixed_batch(MPLUGForVisualReasoning(config), batch, labels)
    assert losses[-1] < 0.6 * losses[0], losses  # the head and trunk fit a fixed batch of embedded rows
