"""MPLUGForRetrieval: features, ITC/ITM losses, corpus retrieval, common behaviour."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from transformers_mplug import MPLUGForRetrieval

from .common import MPLUGModelTesterMixin
from .conftest import tiny_config, tiny_inputs


def config(**overrides):
    return tiny_config(projection_dim=16, **overrides)


class TestRetrievalCommon(MPLUGModelTesterMixin):
    model_class = MPLUGForRetrieval
    recorded_fields = ("vision_hidden_states", "vision_attentions", "text_hidden_states", "text_attentions")

    def make_recording_inputs(self, config):  # an inference pass (the training step does not record)
        return tiny_inputs(config)

    def recording_output_tensors(self, output, inputs):
        return {"logits_per_image": output.logits_per_image, "text_features": output.text_features}

    def make_config(self, **overrides):
        return config(**overrides)

    def make_inputs(self, config, **kwargs):
        inputs = tiny_inputs(config, **kwargs)
        batch = inputs["input_ids"].shape[0]
        # fixed negatives: the batched == one-by-one test slices rows, so pass negatives only for full batches
        inputs["negative_image_indices"] = (torch.arange(batch) + 1) % batch
        inputs["negative_text_indices"] = (torch.arange(batch) + 2) % batch
        return inputs

    def output_tensors(self, output, inputs):
        return {
            "image_features": output.image_features,
            "text_features": output.text_features,
            "loss": output.loss[None],
        }

    def loss_fn(self, output):
        return output.loss

    def test_batched_equals_one_by_one(self):
        model = self.build()
        inputs = tiny_inputs(model.config, padded=True)
        with torch.no_grad():
            image = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
            text = model.get_text_features(inputs["input_ids"], inputs["attention_mask"]).pooler_output
            pairs = model.match_pairs(**inputs)
            for row in range(3):
                keep = int(inputs["attention_mask"][row].sum())
                ids, mask = inputs["input_ids"][row : row + 1, :keep], inputs["attention_mask"][row : row + 1, :keep]
                pixels = inputs["pixel_values"][row : row + 1]
                torch.testing.assert_close(
                    image[row], model.get_image_features(pixel_values=pixels).pooler_output[0], atol=1e-5, rtol=1e-4
                )
                torch.testing.assert_close(
                    text[row], model.get_text_features(ids, mask).pooler_output[0], atol=1e-5, rtol=1e-4
                )
                torch.testing.assert_close(pairs[row], model.match_pairs(pixels, ids, mask)[0], atol=1e-5, rtol=1e-4)


def test_features_are_normalised_projections():
    model = MPLUGForRetrieval(config()).eval()
    inputs = tiny_inputs(model.config)
    with torch.no_grad():
        image = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        raw = model.get_image_features(pixel_values=inputs["pixel_values"], normalize=False).pooler_output
        text = model.get_text_features(inputs["input_ids"], inputs["attention_mask"]).pooler_output
        embeds = model.mplug.encode_image(inputs["pixel_values"])[1]
    assert image.shape == (3, 16) and text.shape == (3, 16)
    torch.testing.assert_close(image.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(raw, model.vision_proj(embeds[:, 0]))
    torch.testing.assert_close(image, torch.nn.functional.normalize(raw, dim=-1))
    assert model.temp.item() == pytest.approx(0.07)


def test_itc_loss_with_queue_and_shared_image_ids():
    model = MPLUGForRetrieval(config()).eval()
    torch.manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(4, 16), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(4, 16), dim=-1)
    idx = torch.tensor([0, 1, 2, 2])
    queue_i = torch.nn.functional.normalize(torch.randn(16, 5), dim=0)
    queue_t = torch.nn.functional.normalize(torch.randn(16, 5), dim=0)
    idx_queue = torch.tensor([[2, -100, 7, 1, -100]])
    loss, sim_i2t, sim_t2i = model.itc_loss(
        image, text, idx, image_queue=queue_i, text_queue=queue_t, idx_queue=idx_queue
    )
    assert sim_i2t.shape == (4, 9)
    ids_all = torch.cat([idx, idx_queue[0]])
    targets = (idx[:, None] == ids_all[None]).float()
    targets = targets / targets.sum(1, keepdim=True)
    t = model.temp.detach()
    i2t = image @ torch.cat([text.t(), queue_t], 1) / t
    t2i = text @ torch.cat([image.t(), queue_i], 1) / t
    expected = (-(i2t.log_softmax(1) * targets).sum(1).mean() - (t2i.log_softmax(1) * targets).sum(1).mean()) / 2
    torch.testing.assert_close(loss, expected)
    in_batch, _, _ = model.itc_loss(image, text)
    plain = torch.nn.functional.cross_entropy(image @ text.t() / t, torch.arange(4))
    plain2 = torch.nn.functional.cross_entropy(text @ image.t() / t, torch.arange(4))
    torch.testing.assert_close(in_batch, (plain + plain2) / 2)
    with pytest.raises(ValueError, match="idx_queue"):
        model.itc_loss(image, text, idx, image_queue=queue_i, text_queue=queue_t)


def test_hard_negatives_never_share_the_image_id_and_training_reduces_loss():
    torch.manual_seed(0)
    model = MPLUGForRetrieval(config()).train()
    inputs = tiny_inputs(model.config, batch_size=4)
    idx = torch.tensor([0, 1, 2, 2])
    inputs["pixel_values"][3] = inputs["pixel_values"][2]
    out = model(**inputs, idx=idx)
    for text_row, image_row in enumerate(out.negative_image_indices.tolist()):
        assert idx[image_row] != idx[text_row]
    for image_row, text_row in enumerate(out.negative_text_indices.tolist()):
        assert idx[text_row] != idx[image_row]
    assert out.itm_logits.shape == (12, 2)
    torch.testing.assert_close(out.loss, out.loss_itc + out.loss_itm)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    first = out.loss.item()
    for _ in range(15):
        loss = model(**inputs, idx=idx).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert loss.item() < first


def test_training_validation():
    model = MPLUGForRetrieval(config())
    inputs = tiny_inputs(model.config, batch_size=1)
    with pytest.raises(ValueError, match="at least 2"):
        model(**inputs)
    inputs = tiny_inputs(model.config, batch_size=2)
    with pytest.raises(ValueError, match="no hard negative"):
        model(**inputs, idx=torch.tensor([3, 3]))


def test_corpus_retrieval_matches_brute_force_itm_and_is_batched(monkeypatch):
    torch.manual_seed(0)
    model = MPLUGForRetrieval(config()).eval()
    images = torch.randn(5, 3, 32, 32)
    texts = tiny_inputs(model.config, batch_size=6, seed=3)
    ids, mask = texts["input_ids"], texts["attention_mask"]
    calls, projected = [], []
    original = model.mplug.cross_modal_encoder.forward

    def counting(image_embeds, text_embeds, attention_mask, image_index=None):
        calls.append(text_embeds.shape[0])
        projected.append(image_embeds.shape[0])
        return original(image_embeds, text_embeds, attention_mask, image_index)

    monkeypatch.setattr(model.mplug.cross_modal_encoder, "forward", counting)
    result = model.retrieve(pixel_values=images, input_ids=ids, attention_mask=mask, k=3, batch_size=4)
    assert sum(calls) == 5 * 3 + 6 * 3 and max(calls) <= 4  # only the ITC candidates are fused, in batches
    assert sum(projected) < sum(calls)  # pairs grouped by image: an image's keys/values serve all its texts
    with torch.no_grad():
        image_feats = model.get_image_features(pixel_values=images).pooler_output
        text_feats = model.get_text_features(ids, mask).pooler_output
        torch.testing.assert_close(result.similarity, image_feats @ text_feats.t(), atol=1e-5, rtol=1e-4)
        for i in range(5):
            candidates = result.similarity[i].topk(3).indices
            logits = model.match_pairs(images[i : i + 1].expand(3, -1, -1, -1), ids[candidates], mask[candidates])
            scores, order = logits[:, 1].sort(descending=True)
            assert result.image_to_text_indices[i].tolist() == candidates[order].tolist()
            torch.testing.assert_close(result.image_to_text_scores[i], scores, atol=1e-5, rtol=1e-4)
        for t in range(6):
            candidates = result.similarity[:, t].topk(3).indices
            logits = model.match_pairs(images[candidates], ids[t : t + 1].expand(3, -1), mask[t : t + 1].expand(3, -1))
            assert (
                result.text_to_image_indices[t].tolist() == candidates[logits[:, 1].argsort(descending=True)].tolist()
            )
    with_itc = model.retrieve(pixel_values=images, input_ids=ids, attention_mask=mask, k=3, add_itc_score=True)
    top_itc = result.similarity.topk(3, dim=1).values
    assert with_itc.image_to_text_scores.shape == (5, 3)
    assert not torch.allclose(with_itc.image_to_text_scores.sort(1).values, top_itc)
    big_k = model.retrieve(pixel_values=images, input_ids=ids, attention_mask=mask, k=100)
    assert big_k.image_to_text_indices.shape == (5, 6) and big_k.text_to_image_indices.shape == (6, 5)


def test_retrieval_validation():
    model = MPLUGForRetrieval(config()).eval()
    with pytest.raises(ValueError, match="input_ids"):
        model.retrieve(pixel_values=torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match="k"):
        model.retrieve(pixel_values=torch.randn(2, 3, 32, 32), input_ids=torch.tensor([[1, 2]]), k=0)
    with pytest.raises(ValueError, match="pixel_values"):
        model.get_image_features()


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize(
    "schedule",
    [
        ["co_attention", "connected_attention", "co_attention"],
        ["co_attention", "co_attention"],
        ["connected_attention", "co_attention"],
    ],
)
def test_shared_image_keys_values_give_the_per_pair_itm_scores(attn_implementation, schedule):
    """Texts scored against shared images (each image projected once per co-attention layer, until the first
    connected-attention layer) give the scores of the per-pair path."""
    torch.manual_seed(0)
    model = MPLUGForRetrieval(config(cross_modal_layer_types=schedule, attn_implementation=attn_implementation)).eval()
    texts = tiny_inputs(model.config, batch_size=7, seed=5)
    ids, mask = texts["input_ids"], texts["attention_mask"]
    with torch.no_grad():
        images = model.mplug.encode_image(torch.randn(3, 3, 32, 32))[1]
        text_embeds = model.mplug.encode_text(ids, mask)
        index = torch.tensor([2, 0, 0, 1, 2, 2, 0])  # several texts per image, any order
        shared = model._itm_logits(images, text_embeds, mask, image_index=index)
        per_pair = model._itm_logits(images[index], text_embeds, mask)
        grouped_index = torch.tensor([0, 0, 1, 1, 2, 2])  # the same number of texts per image, in order
        grouped = model._itm_logits(images, text_embeds[:6], mask[:6], image_index=grouped_index)
        grouped_per_pair = model._itm_logits(images[grouped_index], text_embeds[:6], mask[:6])
        fused_image, _ = model.mplug.cross_modal_encoder(images, text_embeds, mask, image_index=index)
        per_pair_image, _ = model.mplug.cross_modal_encoder(images[index], text_embeds, mask)
    torch.testing.assert_close(shared, per_pair, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grouped, grouped_per_pair, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused_image, per_pair_image, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="one entry per text"):
        model.mplug.cross_modal_encoder(images, text_embeds, mask, image_index=index[:3])


def test_retrieve_on_two_processes_equals_one(tmp_path, cpu_launch):
    """`retrieve(distributed=True)` under `accelerate launch --num_processes 2`: every rank returns the one-process
    output (shares of unequal size, a rank without images, more candidates than the gallery)."""
    cpu_launch(Path(__file__).parent / "distributed_retrieval_check.py", str(tmp_path), cwd=tmp_path)
    for rank in range(2):
        report = json.loads((tmp_path / f"retrieve_rank{rank}.json").read_text())
        assert report["world_size"] == 2 and len(report["cases"]) == 3
        for case in report["cases"]:
            assert case["indices_equal"], case
            assert case["max_abs_diff"] < 1e-5, case
