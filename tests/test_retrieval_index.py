"""MPLUGRetrievalIndex: a persistent image index (faiss ITC features, memory-mapped image tokens) for text search."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from transformers_mplug import MPLUGForRetrieval, MPLUGRetrievalIndex

from .conftest import tiny_config, tiny_inputs

pytest.importorskip("faiss", reason="the index needs faiss-cpu (the `index` extra)")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MPLUGForRetrieval(tiny_config(projection_dim=16)).eval()


@pytest.fixture(scope="module")
def gallery():
    return torch.randn(11, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def queries(model):
    return tiny_inputs(model.config, batch_size=5, seed=4)


@pytest.mark.parametrize("token_dtype", ["float32", "bfloat16"])
def test_search_equals_retrieve_on_the_same_gallery(tmp_path, model, gallery, queries, token_dtype):
    index = MPLUGRetrievalIndex.build(
        model, gallery, tmp_path / "index", batch_size=4, token_dtype=token_dtype, progress=False
    )
    ids, mask = queries["input_ids"], queries["attention_mask"]
    found = index.search(model, input_ids=ids, attention_mask=mask, k=3, batch_size=2)
    with torch.no_grad():
        expected = model.retrieve(pixel_values=gallery, input_ids=ids, attention_mask=mask, k=3)
    if token_dtype == "float32":
        assert torch.equal(found.indices, expected.text_to_image_indices)
        torch.testing.assert_close(found.scores, expected.text_to_image_scores, atol=1e-5, rtol=1e-4)
    else:  # tokens stored in bf16: the ITC candidates are the same, ITM scores within bf16 rounding
        assert set(found.indices.flatten().tolist()) <= set(expected.text_to_image_indices.flatten().tolist()) | set(
            expected.similarity.t().topk(3).indices.flatten().tolist()
        )
        torch.testing.assert_close(
            found.scores.sort(1).values, expected.text_to_image_scores.sort(1).values, atol=0.05, rtol=0.05
        )
    itc = expected.similarity.t().gather(1, found.indices)
    torch.testing.assert_close(found.itc_scores, itc, atol=1e-5, rtol=1e-4)
    plain = index.search(model, input_ids=ids, attention_mask=mask, k=4, rerank=False)
    assert torch.equal(plain.indices, expected.similarity.t().topk(4).indices)
    # the stored tokens are the model's image tokens, read for the asked rows only
    with torch.no_grad():
        tokens = model.mplug.encode_image(gallery[[7, 2]])[1]
    tolerance = dict(atol=1e-6, rtol=0) if token_dtype == "float32" else dict(atol=0.05, rtol=0.02)
    torch.testing.assert_close(index.image_tokens(torch.tensor([7, 2])).float(), tokens, **tolerance)


def test_save_load_round_trip_and_model_checks(tmp_path, model, gallery, queries):
    index = MPLUGRetrievalIndex.build(model, gallery, tmp_path / "built", batch_size=5, progress=False)
    index.save(tmp_path / "copy")
    loaded = MPLUGRetrievalIndex.load(tmp_path / "copy", model)
    ids, mask = queries["input_ids"], queries["attention_mask"]
    first = index.search(model, input_ids=ids, attention_mask=mask, k=4)
    again = loaded.search(model, input_ids=ids, attention_mask=mask, k=4, num_candidates=4)
    assert torch.equal(first.indices, again.indices) and torch.equal(first.scores, again.scores)
    record = json.loads((tmp_path / "copy" / "index.json").read_text())
    assert record["num_images"] == 11 and record["complete"] and len(record["shards"]) == 3
    torch.manual_seed(1)
    other_weights = MPLUGForRetrieval(tiny_config(projection_dim=16)).eval()
    with pytest.raises(ValueError, match="other weights"):
        MPLUGRetrievalIndex.load(tmp_path / "copy", other_weights)
    other_config = MPLUGForRetrieval(tiny_config(projection_dim=8)).eval()
    with pytest.raises(ValueError, match="configs differ in .*projection_dim"):
        MPLUGRetrievalIndex.load(tmp_path / "copy", other_config)
    with pytest.raises(ValueError, match="already holds an index"):
        MPLUGRetrievalIndex.build(model, gallery, tmp_path / "built", progress=False)
    with pytest.raises(ValueError, match="no index.json"):
        MPLUGRetrievalIndex.load(tmp_path, model)


def test_an_interrupted_build_resumes_without_losing_rows(tmp_path, model, gallery, queries, monkeypatch):
    folder = tmp_path / "index"
    calls = {"n": 0}
    original = model.mplug.encode_image

    def failing(pixel_values, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # the third batch never finishes
        return original(pixel_values, *args, **kwargs)

    monkeypatch.setattr(model.mplug, "encode_image", failing)
    with pytest.raises(KeyboardInterrupt):
        MPLUGRetrievalIndex.build(model, gallery, folder, batch_size=4, progress=False)
    record = json.loads((folder / "index.json").read_text())
    assert [s["rows"] for s in record["shards"]] == [4, 4] and not record["complete"]
    with pytest.raises(ValueError, match="not complete"):
        MPLUGRetrievalIndex.load(folder, model)
    monkeypatch.setattr(model.mplug, "encode_image", original)
    seen = []
    monkeypatch.setattr(
        model.mplug, "encode_image", lambda pixels, *a, **kw: seen.append(pixels.shape[0]) or original(pixels, *a, **kw)
    )
    resumed = MPLUGRetrievalIndex.build(model, gallery, folder, batch_size=4, progress=False)
    assert seen == [3]  # only the rows not written yet
    fresh = MPLUGRetrievalIndex.build(model, gallery, tmp_path / "fresh", batch_size=4, progress=False)
    ids, mask = queries["input_ids"], queries["attention_mask"]
    assert torch.equal(
        resumed.search(model, input_ids=ids, attention_mask=mask, k=3).indices,
        fresh.search(model, input_ids=ids, attention_mask=mask, k=3).indices,
    )


def test_images_from_files_texts_from_the_processor_and_an_approximate_index(tmp_path, model, processor):
    paths = []
    for i in range(6):
        path = tmp_path / f"image_{i}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    index = MPLUGRetrievalIndex.build(
        model, paths, tmp_path / "hnsw", processor=processor, index_type="hnsw", batch_size=4, progress=False
    )
    found = index.search(model, ["a red cat", "two dogs"], processor=processor, k=2, num_candidates=6)
    pixels = processor(images=[Image.open(p).convert("RGB") for p in paths])["pixel_values"]
    texts = processor(text=["a red cat", "two dogs"])
    with torch.no_grad():
        expected = model.retrieve(pixel_values=pixels, **texts, k=6)
    assert torch.equal(found.indices, expected.text_to_image_indices[:, :2])  # all 6 re-ranked: the same top 2
    with pytest.raises(ValueError, match="`processor`"):
        MPLUGRetrievalIndex.build(model, paths, tmp_path / "x", progress=False)
    with pytest.raises(ValueError, match="index_type"):
        MPLUGRetrievalIndex.build(model, paths, tmp_path / "y", processor=processor, index_type="ivf")
    with pytest.raises(ValueError, match="num_candidates"):
        index.search(model, ["a cat"], processor=processor, k=3, num_candidates=2)


def test_corrupted_indexes_and_bad_queries_raise(tmp_path, model, gallery, queries, caplog):
    folder = tmp_path / "index"
    index = MPLUGRetrievalIndex.build(model, gallery[:5], folder, batch_size=2, progress=False)
    ids = queries["input_ids"]
    with pytest.raises(ValueError, match="queries are empty"):
        index.search(model, input_ids=ids[:0])
    with caplog.at_level("WARNING"):
        capped = index.search(model, input_ids=ids, k=50)
    assert capped.indices.shape == (5, 5) and "larger than the index" in caplog.text
    (folder / "features.faiss").write_bytes(b"not faiss")
    with pytest.raises(ValueError, match="features.faiss cannot be read"):
        MPLUGRetrievalIndex.load(folder, model)
    (folder / "shard_00001.safetensors").unlink()
    with pytest.raises(ValueError, match="lacks the shard file"):
        MPLUGRetrievalIndex.load(folder, model)
    (folder / "index.json").write_text("{ truncated")
    with pytest.raises(ValueError, match="index.json is corrupted"):
        MPLUGRetrievalIndex.load(folder, model)
