"""MPLUGForCaptioning: vision-only trunk, loss, prompts, generate, common behaviour."""

from __future__ import annotations

import pytest
import torch

from transformers_mplug import MPLUGForCaptioning, MPLUGModel

from .common import MPLUGGenerationTesterMixin, MPLUGModelTesterMixin
from .conftest import tiny_config, tiny_inputs

BOS, EOS = 101 % 128, 102 % 128


def captions(num: int, seed: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (num, 6), generator=generator)
    ids[:, 0], ids[:, -1] = BOS, EOS
    ids[1::2, -3:] = torch.tensor([EOS, -100, -100])
    return ids


class TestCaptioningCommon(MPLUGModelTesterMixin):
    model_class = MPLUGForCaptioning

    def make_inputs(self, config, batch_size: int = 3, padded: bool = True, **kwargs):
        pixel_values = tiny_inputs(config, batch_size=batch_size, **kwargs)["pixel_values"]
        labels = captions(batch_size)
        if not padded:
            labels = labels.masked_fill(labels == -100, 7)
        attention_mask = (labels != -100).long()
        return {
            "pixel_values": pixel_values,
            "input_ids": labels.masked_fill(labels == -100, 0),
            "attention_mask": attention_mask,
            "labels": labels,
        }

    def output_tensors(self, output, inputs):
        mask = inputs["attention_mask"] if inputs is not None else 1
        logits = output.logits * (mask[..., None] if inputs is not None else 1)
        return {"logits": logits, "loss_per_sequence": output.loss_per_sequence}

    def loss_fn(self, output):
        return output.loss

    def test_batched_equals_one_by_one(self):
        model = self.build()
        inputs = self.make_inputs(model.config)
        with torch.no_grad():
            batched = model(**inputs)
            for row in range(3):
                keep = int(inputs["attention_mask"][row].sum())
                single = {
                    k: v[row : row + 1, :keep] if k != "pixel_values" else v[row : row + 1] for k, v in inputs.items()
                }
                alone = model(**single)
                torch.testing.assert_close(batched.logits[row, :keep], alone.logits[0], atol=1e-5, rtol=1e-4)
                torch.testing.assert_close(
                    batched.loss_per_sequence[row], alone.loss_per_sequence[0], atol=1e-5, rtol=1e-4
                )


def test_captioner_has_no_text_encoder_or_fusion():
    model = MPLUGForCaptioning(tiny_config())
    assert model.mplug.text_model is None and model.mplug.cross_modal_encoder is None
    keys = model.state_dict().keys()
    assert not any(k.startswith(("mplug.text_model", "mplug.cross_modal_encoder")) for k in keys)
    assert any(k.startswith("mplug.vision_model") for k in keys)


def test_loss_is_token_mean_and_prompt_tokens_can_be_ignored():
    model = MPLUGForCaptioning(tiny_config()).eval()
    pixel_values = torch.randn(2, 3, 32, 32)
    labels = captions(2)
    with torch.no_grad():
        out = model(pixel_values=pixel_values, labels=labels)
    logp = out.logits[:, :-1].log_softmax(-1)
    targets = labels[:, 1:]
    token_nll = -logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    valid = targets != -100
    torch.testing.assert_close(out.loss, token_nll[valid].mean(), atol=1e-5, rtol=1e-5)
    prompted = labels.clone()
    prompted[:, :3] = -100  # "[CLS] a picture" as a prompt: no loss there
    with torch.no_grad():
        out2 = model(
            pixel_values=pixel_values,
            input_ids=labels.masked_fill(labels == -100, 0),
            attention_mask=(labels != -100).long(),
            labels=prompted,
        )
    valid2 = prompted[:, 1:] != -100
    torch.testing.assert_close(out2.loss, token_nll[valid2].mean(), atol=1e-5, rtol=1e-5)


def test_full_trunk_loads_into_the_captioner_and_reports_what_was_left_out(tmp_path):
    trunk = MPLUGModel(tiny_config()).eval()
    trunk.save_pretrained(tmp_path)
    # transformers' load report lists these keys as UNEXPECTED; the loading info carries them
    model, info = MPLUGForCaptioning.from_pretrained(tmp_path, output_loading_info=True)
    unexpected = set(info["unexpected_keys"])
    assert unexpected and all(
        k.startswith(("text_model.", "cross_modal_encoder.", "mplug.text_model", "mplug.cross_modal_encoder"))
        for k in unexpected
    )
    assert all(k.startswith("text_decoder.") for k in info["missing_keys"])
    for name, tensor in trunk.state_dict().items():
        if name.startswith("vision_"):
            assert torch.equal(model.mplug.state_dict()[name], tensor), name


def test_generate_defaults_prompt_and_video():
    torch.manual_seed(0)
    model = MPLUGForCaptioning(tiny_config()).eval()
    config = model.generation_config
    assert (config.num_beams, config.min_new_tokens, config.max_new_tokens) == (5, 8, 25)
    pixel_values = torch.randn(2, 3, 32, 32)
    out = model.generate(pixel_values=pixel_values, num_beams=2, max_new_tokens=9)
    assert out.shape[0] == 2 and 9 <= out.shape[1] - 1 <= 9 and torch.all(out[:, 0] == BOS)
    prompt = torch.tensor([[BOS, 11, 12]])
    prompted = model.generate(
        pixel_values=pixel_values, input_ids=prompt, num_beams=1, min_new_tokens=2, max_new_tokens=4
    )
    assert torch.all(prompted[:, :3] == prompt)
    video = model.generate(
        pixel_values=torch.randn(1, 2, 3, 32, 32), input_ids=prompt, num_beams=2, min_new_tokens=1, max_new_tokens=3
    )
    assert video.shape[0] == 1 and torch.all(video[:, :3] == prompt)
    # greedy decoding equals the argmax of teacher-forced logits, step by step
    greedy = model.generate(pixel_values=pixel_values[:1], num_beams=1, min_new_tokens=5, max_new_tokens=5)
    with torch.no_grad():
        logits = model(pixel_values=pixel_values[:1], input_ids=greedy).logits
    logits[:, :, EOS] = -float("inf")  # min_new_tokens blocks [SEP]
    assert torch.equal(logits[0, :-1].argmax(-1), greedy[0, 1:])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(input_ids=torch.tensor([[7, 8]])), r"\[CLS\]"),
        (
            dict(input_ids=torch.tensor([[BOS, 8], [BOS, 0]]), attention_mask=torch.tensor([[1, 1], [1, 0]])),
            "same length",
        ),
        (dict(input_ids=torch.tensor([BOS, 8])), "input_ids"),
    ],
)
def test_bad_prompts_raise(kwargs, match):
    model = MPLUGForCaptioning(tiny_config()).eval()
    with pytest.raises(ValueError, match=match):
        model.generate(pixel_values=torch.randn(2, 3, 32, 32), **kwargs)


def test_forward_validation():
    model = MPLUGForCaptioning(tiny_config()).eval()
    with pytest.raises(ValueError, match="labels"):
        model(pixel_values=torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="Batch size mismatch"):
        model(pixel_values=torch.randn(2, 3, 32, 32), labels=captions(3))
    with pytest.raises(ValueError, match="pixel_values"):
        model(labels=captions(1))


class TestForCaptioningGeneration(MPLUGGenerationTesterMixin):
    model_class = MPLUGForCaptioning

    def make_inputs(self, config, **kwargs):
        return {"pixel_values": tiny_inputs(config, **kwargs)["pixel_values"]}
