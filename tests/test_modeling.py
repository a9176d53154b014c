"""MPLUGModel: shapes, the cross-modal layer semantics, video, common behaviour."""

from __future__ import annotations

import pytest
import torch

from transformers_mplug import MPLUGConfig, MPLUGModel
from transformers_mplug.modeling_mplug import MPLUGCrossModalLayer

from .common import MPLUGModelTesterMixin
from .conftest import tiny_config, tiny_inputs


def _valid(text: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (text * mask[..., None])[:, : int(mask.sum(1).max())]


class TestMPLUGModelCommon(MPLUGModelTesterMixin):
    model_class = MPLUGModel

    def output_tensors(self, output, inputs):
        mask = inputs["attention_mask"] if inputs is not None else torch.ones(output.text_embeds.shape[:2])
        return {
            "image_embeds": output.image_embeds,
            "fused_image_embeds": output.fused_image_embeds,
            "text_embeds": _valid(output.text_embeds, mask),
            "fused_text_embeds": _valid(output.fused_text_embeds, mask),
        }


class TestMPLUGModelCommonNoProjection(TestMPLUGModelCommon):
    """Vision width == text width (base-style, no projection); the default tiny config is large-style."""

    def make_config(self, **overrides):
        vision = dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=16,
            hidden_act="quick_gelu",
        )
        return tiny_config(vision_config=vision, **overrides)


def test_output_shapes_and_memory():
    config = tiny_config()
    model = MPLUGModel(config).eval()
    inputs = tiny_inputs(config, batch_size=2)
    with torch.no_grad():
        out = model(**inputs)
    n = config.num_image_tokens
    assert n == 5
    assert out.vision_last_hidden_state.shape == (2, n, 48)
    assert out.image_embeds.shape == (2, n, 32)
    assert out.text_embeds.shape == (2, 7, 32)
    assert out.fused_image_embeds.shape == (2, n, 32)
    assert out.fused_text_embeds.shape == (2, 7, 32)
    torch.testing.assert_close(out.last_hidden_state, torch.cat([out.fused_image_embeds, out.fused_text_embeds], 1))
    expected_mask = torch.cat([torch.ones(2, n, dtype=torch.long), inputs["attention_mask"]], 1)
    assert torch.equal(out.memory_attention_mask, expected_mask)


def test_projection_only_when_widths_differ():
    assert MPLUGModel(tiny_config()).vision_projection is not None
    same = tiny_config(
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=16,
        )
    )
    model = MPLUGModel(same)
    assert model.vision_projection is None
    assert not any(k.startswith("vision_projection") for k in model.state_dict())


def test_layers_follow_schedule_and_connected_layers_have_no_cross_attention():
    config = tiny_config(cross_modal_layer_types=["co_attention", "connected_attention"])
    model = MPLUGModel(config)
    layers = model.cross_modal_encoder.layer
    assert [layer.layer_type for layer in layers] == ["co_attention", "connected_attention"]
    assert hasattr(layers[0], "crossattention")
    assert not hasattr(layers[1], "crossattention")


def _manual_layer(layer: MPLUGCrossModalLayer, image, text, mask):
    """The layer written out from DESIGN.md with explicit matrix products (eager, no dropout)."""

    def attention(block, queries, keys, key_mask):
        heads = block.self.num_attention_heads

        def split(x):
            return x.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)

        q, k, v = split(block.self.query(queries)), split(block.self.key(keys)), split(block.self.value(keys))
        scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
        if key_mask is not None:
            scores = scores + (1.0 - key_mask[:, None, None, :].float()) * -10000.0
        context = (scores.softmax(-1) @ v).transpose(1, 2).reshape(queries.shape)
        return block.output.LayerNorm(block.output.dense(context) + queries)

    def ffn(h):
        return layer.output.LayerNorm(layer.output.dense(layer.intermediate(h)) + h)

    if layer.layer_type == "co_attention":
        text = attention(layer.attention, text, text, mask)
        text = attention(layer.crossattention, text, image, None)
        return image, ffn(text)
    joint = torch.cat([image, text], 1)
    joint_mask = torch.cat([torch.ones(image.shape[:2]), mask.float()], 1)
    joint = ffn(attention(layer.attention, joint, joint, joint_mask))
    return image + joint[:, : image.shape[1]], joint[:, image.shape[1] :]


@pytest.mark.parametrize("layer_type", ["co_attention", "connected_attention"])
def test_cross_modal_layer_matches_written_out_formula(layer_type):
    config = tiny_config(cross_modal_layer_types=[layer_type])
    model = MPLUGModel._from_config(config, attn_implementation="eager").eval()
    inputs = tiny_inputs(config, batch_size=2)
    with torch.no_grad():
        out = model(**inputs)
        expected_v, expected_t = _manual_layer(
            model.cross_modal_encoder.layer[0], out.image_embeds, out.text_embeds, inputs["attention_mask"]
        )
    mask = inputs["attention_mask"]
    torch.testing.assert_close(out.fused_image_embeds, expected_v, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(_valid(out.fused_text_embeds, mask), _valid(expected_t, mask), atol=1e-5, rtol=1e-4)
    if layer_type == "co_attention":
        assert torch.equal(out.fused_image_embeds, out.image_embeds)
    else:
        assert not torch.allclose(out.fused_image_embeds, out.image_embeds)


def test_video_frames_encoded_one_by_one_and_concatenated():
    config = tiny_config()
    model = MPLUGModel(config).eval()
    inputs = tiny_inputs(config, batch_size=2)
    frames = torch.randn(2, 3, 3, 32, 32)
    with torch.no_grad():
        out = model(pixel_values=frames, input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        per_frame = [model.encode_image(frames[:, t])[1] for t in range(3)]
    assert out.image_embeds.shape == (2, 3 * config.num_image_tokens, 32)
    torch.testing.assert_close(out.image_embeds, torch.cat(per_frame, 1), atol=1e-6, rtol=1e-5)


def test_precomputed_image_embeds_give_same_result():
    config = tiny_config()
    model = MPLUGModel(config).eval()
    inputs = tiny_inputs(config)
    with torch.no_grad():
        full = model(**inputs)
        _, image_embeds = model.encode_image(inputs["pixel_values"])
        again = model(image_embeds=image_embeds, input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    torch.testing.assert_close(full.last_hidden_state, again.last_hidden_state, atol=0, rtol=0)
    assert again.vision_last_hidden_state is None


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(input_ids=None), ValueError, "input_ids"),
        (dict(pixel_values=None), ValueError, "pixel_values"),
        (dict(pixel_values=torch.randn(2, 3, 32, 32)), ValueError, "Batch size mismatch"),
        (dict(pixel_values=torch.randn(3, 32, 32)), ValueError, "pixel_values"),
        (dict(pixel_values=torch.randn(3, 1, 32, 32)), ValueError, "channels"),
        (dict(pixel_values=[[0.0]]), TypeError, "pixel_values"),
        (dict(attention_mask=torch.ones(3, 2, dtype=torch.long)), ValueError, "attention_mask"),
        (dict(bogus=1), TypeError, "bogus"),
    ],
)
def test_bad_inputs_raise_naming_the_argument(kwargs, error, match):
    config = tiny_config()
    model = MPLUGModel(config).eval()
    inputs = tiny_inputs(config)
    inputs.update(kwargs)
    with pytest.raises(error, match=match):
        model(**inputs)


def test_wrong_image_size_raises():
    config = tiny_config()
    model = MPLUGModel(config).eval()
    inputs = tiny_inputs(config)
    inputs["pixel_values"] = torch.randn(3, 3, 48, 48)
    with pytest.raises(ValueError):
        model(**inputs)


def test_init_is_deterministic_and_sane():
    torch.manual_seed(0)
    a = MPLUGModel(tiny_config())
    torch.manual_seed(0)
    b = MPLUGModel(tiny_config())
    for (name, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), name
    std = a.cross_modal_encoder.layer[0].attention.self.query.weight.std().item()
    assert 0.01 < std < 0.03
    ln = a.cross_modal_encoder.layer[0].output.LayerNorm
    assert torch.all(ln.weight == 1) and torch.all(ln.bias == 0)
    assert torch.equal(a.vision_model.embeddings.position_ids[0], torch.arange(5))


def test_no_split_modules_and_base_prefix():
    assert "MPLUGCrossModalLayer" in MPLUGModel._no_split_modules
    assert MPLUGModel.base_model_prefix == "mplug"
    assert isinstance(MPLUGModel(tiny_config()).config, MPLUGConfig)
