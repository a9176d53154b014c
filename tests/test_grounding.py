"""MPLUGForGrounding and the processor's grounding helpers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from transformers_mplug import MPLUGForGrounding, MPLUGProcessor
from transformers_mplug.modeling_mplug import box_cxcywh_to_xyxy, generalized_box_iou_pairs

from .common import MPLUGModelTesterMixin
from .conftest import tiny_config, tiny_inputs

GROUNDING = dict(grounding_prefix_token_id=20, coordinate_token_start_id=21, num_coordinate_bins=33)


def config(**overrides):
    return tiny_config(**GROUNDING, **overrides)


def target_boxes(num: int) -> torch.Tensor:
    return torch.tensor([[0.3, 0.55, 0.2, 0.5], [0.62, 0.4, 0.35, 0.3], [0.5, 0.5, 0.9, 0.8]])[:num]


class TestGroundingCommon(MPLUGModelTesterMixin):
    model_class = MPLUGForGrounding

    def make_config(self, **overrides):
        return config(**overrides)

    def make_inputs(self, config, **kwargs):
        inputs = tiny_inputs(config, **kwargs)
        inputs["boxes"] = target_boxes(inputs["input_ids"].shape[0])
        return inputs

    def output_tensors(self, output, inputs):
        return {"logits": output.logits, "token_loss": output.token_loss}

    def loss_fn(self, output):
        return output.token_loss.sum()


def test_box_tokens_round_trip_and_loss_formula():
    model = MPLUGForGrounding(config()).eval()
    boxes = target_boxes(3)
    tokens = model.boxes_to_tokens(boxes)
    assert tokens.min() >= 21 and tokens.max() < 21 + 33
    assert torch.equal(tokens, (boxes * 32).floor().long() + 21)
    assert torch.all((model.tokens_to_boxes(tokens) - boxes).abs() <= 1 / 32)
    inputs = tiny_inputs(model.config)
    with torch.no_grad():
        out = model(**inputs, boxes=boxes)
    assert out.logits.shape == (3, 5, 128)
    outside = torch.ones(128, dtype=torch.bool)
    outside[21:54] = False
    assert torch.all(out.logits[..., outside] < -5000)
    weights_l1 = (out.pred_boxes - boxes).abs().clamp(0, 5)
    weights_giou = 1 - generalized_box_iou_pairs(box_cxcywh_to_xyxy(out.pred_boxes), box_cxcywh_to_xyxy(boxes))
    per_pair = out.token_loss[:, None, :] * (weights_l1 * weights_giou[:, None])[None]
    torch.testing.assert_close(out.loss, per_pair.mean())  # the original's batch broadcast
    model.config.grounding_loss_weighting = "per_box"
    with torch.no_grad():
        per_box = model(**inputs, boxes=boxes).loss
    torch.testing.assert_close(per_box, (out.token_loss * weights_l1 * weights_giou[:, None]).mean())


def test_giou_of_known_boxes():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [2.0, 0.0, 3.0, 1.0]])
    giou = generalized_box_iou_pairs(a, b)
    # pair 0: inter 1, union 7, hull 9 -> 1/7 - 2/9; pair 1: disjoint, hull 3, union 2 -> -1/3
    torch.testing.assert_close(giou, torch.tensor([1 / 7 - 2 / 9, -1 / 3]), atol=1e-4, rtol=0)


def test_prediction_is_constrained_greedy_and_matches_teacher_forcing():
    torch.manual_seed(0)
    model = MPLUGForGrounding(config()).eval()
    inputs = tiny_inputs(model.config)
    pred = model.predict_boxes(**inputs)
    assert pred.pred_tokens.shape == (3, 4) and pred.logits.shape == (3, 4, 128)
    assert torch.all((pred.pred_tokens >= 21) & (pred.pred_tokens < 54))
    assert torch.all((pred.scores > 0) & (pred.scores <= 1))
    with torch.no_grad():  # feeding the predicted tokens back gives the same per-step logits
        forced = model(**inputs, boxes=model.tokens_to_boxes(pred.pred_tokens))
    torch.testing.assert_close(forced.logits[:, :-1, 21:54], pred.logits[..., 21:54], atol=1e-4, rtol=1e-4)
    assert torch.equal(forced.pred_tokens, pred.pred_tokens)
    same = model(**inputs)  # forward without boxes predicts
    assert torch.equal(same.pred_tokens, pred.pred_tokens)


def test_padded_batch_equals_one_by_one():
    torch.manual_seed(0)
    model = MPLUGForGrounding(config()).eval()
    inputs = tiny_inputs(model.config, padded=True)
    batched = model.predict_boxes(**inputs)
    for row in range(3):
        keep = int(inputs["attention_mask"][row].sum())
        single = model.predict_boxes(inputs["pixel_values"][row : row + 1], inputs["input_ids"][row : row + 1, :keep])
        assert torch.equal(single.pred_tokens[0], batched.pred_tokens[row])


def test_grounding_token_ids_are_validated():
    with pytest.raises(ValueError, match="vocabulary"):
        MPLUGForGrounding(tiny_config())  # default ids 344.. do not fit a 128-token vocabulary
    with pytest.raises(ValueError, match="prefix"):
        MPLUGForGrounding(
            tiny_config(grounding_prefix_token_id=22, coordinate_token_start_id=21, num_coordinate_bins=33)
        )
    model = MPLUGForGrounding(config())
    with pytest.raises(ValueError, match="boxes"):
        model(**tiny_inputs(model.config), boxes=torch.zeros(2, 4))


# ------------------------------------------------------------------------------------------------ processor
@pytest.fixture
def grounding_processor(processor):
    return MPLUGProcessor(
        processor.image_processor, processor.tokenizer, coordinate_start_token="[unused20]", num_coordinate_bins=33
    )


def test_letterbox_geometry_and_pixel_round_trip(grounding_processor):
    image = Image.fromarray(np.full((20, 40, 3), 200, np.uint8))  # width 40, height 20
    out = grounding_processor.image_processor.preprocess_grounding(image)
    assert out["pixel_values"].shape == (1, 3, 32, 32)
    width, height, scale, left, top = out["image_geometry"][0].tolist()
    assert (width, height, left, top) == (40, 20, 0, 8) and scale == pytest.approx(0.8)
    pixels = out["pixel_values"][0]
    assert torch.all(pixels[:, :8] == 0) and torch.all(pixels[:, 24:] == 0)  # centred, zero padding
    expected = (200 / 255 - 0.485) / 0.229
    assert pixels[0, 16, 16].item() == pytest.approx(expected, abs=1e-5)
    boxes = torch.tensor([[10.0, 5.0, 30.0, 15.0]])
    normalized = grounding_processor.box_pixels_to_normalized(boxes, out["image_geometry"])
    torch.testing.assert_close(normalized, torch.tensor([[0.5, 0.5, 0.5, 0.25]]))
    back = grounding_processor.box_normalized_to_pixels(normalized, out["image_geometry"])
    torch.testing.assert_close(back, boxes)
    clipped = grounding_processor.box_normalized_to_pixels(torch.tensor([[0.5, 0.5, 1.0, 1.0]]), out["image_geometry"])
    torch.testing.assert_close(clipped, torch.tensor([[0.0, 0.0, 40.0, 20.0]]))


def test_prepare_grounding_and_post_process(grounding_processor):
    images = [Image.new("RGB", (40, 20)), Image.new("RGB", (16, 32))]
    batch = grounding_processor.prepare_grounding(
        images, ["what cat", "the dog"], boxes=[[0, 0, 20, 20], [4, 4, 12, 30]]
    )
    assert batch["pixel_values"].shape == (2, 3, 32, 32) and batch["boxes"].shape == (2, 4)
    ids = batch["input_ids"][0].tolist()
    assert ids[0] == 101 and ids[-1] == 102  # grounding phrases keep [SEP], as the original dataset code
    torch.manual_seed(0)
    model = MPLUGForGrounding(config()).eval()
    pred = model.predict_boxes(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
    results = grounding_processor.post_process_grounding(pred, batch["image_geometry"])
    assert len(results) == 2 and set(results[0]) == {"box", "score"}
    x1, y1, x2, y2 = results[1]["box"]
    assert 0 <= x1 <= x2 <= 16 and 0 <= y1 <= y2 <= 32
    tokens = grounding_processor.boxes_to_tokens(batch["boxes"])
    assert torch.equal(tokens, model.boxes_to_tokens(batch["boxes"]))
    torch.testing.assert_close(grounding_processor.tokens_to_boxes(tokens), model.tokens_to_boxes(tokens))
    with pytest.raises(ValueError, match="coordinate"):
        grounding_processor.tokens_to_boxes(torch.tensor([5]))
    with pytest.raises(ValueError, match="Batch size mismatch"):
        grounding_processor.prepare_grounding(images, ["one phrase"])


def test_processor_grounding_settings_round_trip(grounding_processor, tmp_path):
    grounding_processor.save_pretrained(tmp_path)
    loaded = MPLUGProcessor.from_pretrained(tmp_path)
    assert loaded.num_coordinate_bins == 33 and loaded.coordinate_start_token == "[unused20]"
    assert loaded.coordinate_token_start_id == grounding_processor.coordinate_token_start_id == 21


def test_grounding_input_mistakes_are_errors(grounding_processor):
    torch.manual_seed(0)
    model = MPLUGForGrounding(config()).eval()
    inputs = tiny_inputs(model.config, batch_size=2)
    with pytest.raises(ValueError, match=r"normalised \(cx, cy, w, h\) in \[0, 1\].*prepare_grounding"):
        model(**inputs, boxes=torch.tensor([[120.0, 40.0, 60.0, 30.0], [0.5, 0.5, 0.2, 0.2]]))  # pixel boxes
    images = [Image.new("RGB", (40, 20)), Image.new("RGB", (16, 32))]
    batch = grounding_processor.prepare_grounding(images, ["what cat", "the dog"])
    pred = model.predict_boxes(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
    with pytest.raises(ValueError, match="`image_geometry` has 1 rows for 2 boxes"):
        grounding_processor.post_process_grounding(pred, batch["image_geometry"][:1])
    # a 4000 x 1 strip letterboxes to a one-pixel-high band instead of failing inside PIL
    strip = grounding_processor.prepare_grounding(Image.new("RGB", (4000, 1), (255, 255, 255)), "the line")
    assert strip["pixel_values"].shape == (1, 3, 32, 32)
    assert torch.isfinite(strip["pixel_values"]).all()
