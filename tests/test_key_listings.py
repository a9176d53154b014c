"""The full-size key listings of the released checkpoints (AliceMind `.pth` files and ModelScope folders) map strictly
onto our classes, on meta tensors: every key placed or dropped for a named reason, every model weight filled with
the right shape."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from transformers_mplug.original_checkpoint import (
    config_from_original,
    detect_original_tasks,
    map_original_state_dict,
)

from .conftest import REFERENCE_DIR

TASK_CLASSES = {
    "vqa": "MPLUGForQuestionAnswering",
    "caption": "MPLUGForCaptioning",
    "retrieval": "MPLUGForRetrieval",
    "grounding": "MPLUGForGrounding",
}
ALICEMIND = {
    "vqa_base": "vqa",
    "vqa_large": "vqa",
    "caption_base": "caption",
    "caption_large": "caption",
    "retrieval_coco_large": "retrieval",
    "retrieval_msrvtt_large": "retrieval",
    "grounding_large": "grounding",
    "videoqa_base": "vqa",
    "videocap_large": "caption",
}
MODELSCOPE = {
    "visual-question-answering_large": "vqa",
    "image-captioning_base": "caption",
    "image-captioning_large": "caption",
    "image-text-retrieval_large": "retrieval",
}


def meta_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        pytest.skip(f"key listing not found at {path}")
    state = {}
    with open(path, encoding="utf-8") as handle:
        for row in csv.DictReader(handle, delimiter="\t"):
            shape = [int(n) for n in row["shape"].split("x")] if row["shape"] not in ("", "scalar") else []
            state[row["key"]] = torch.empty(shape, dtype=getattr(torch, row["dtype"]), device="meta")
    return state


def assert_maps_strictly(state: dict[str, torch.Tensor], config, task: str) -> dict[str, list[str]]:
    import transformers_mplug

    tasks, found = detect_original_tasks(state)
    assert task in tasks, found
    mapping = map_original_state_dict(state, config, task)
    assert mapping.unmapped == []
    with torch.device("meta"):
        model = getattr(transformers_mplug, TASK_CLASSES[task])(config)
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    placed = {key: tuple(value.shape) for key, value in mapping.state_dict.items()}
    assert sorted(set(expected) - set(placed)) == [] and sorted(set(placed) - set(expected)) == []
    assert {k: v for k, v in placed.items() if v != expected[k]} == {}
    return mapping.dropped


@pytest.mark.parametrize("name", sorted(ALICEMIND))
def test_alicemind_listings_map_strictly(name):
    summary_path = REFERENCE_DIR / "keys" / "summary.json"
    state = meta_state_dict(REFERENCE_DIR / "keys" / f"{name}.tsv")
    summary = json.loads(summary_path.read_text())[name]
    config = config_from_original(None, state, image_size=summary["image_res"])
    dropped = assert_maps_strictly(state, config, ALICEMIND[name])
    assert dropped  # the CLIP text tower at least


@pytest.mark.parametrize("name", sorted(MODELSCOPE))
def test_modelscope_listings_map_strictly(name):
    root = REFERENCE_DIR / "modelscope" / "keys"
    state = meta_state_dict(root / f"{name}.tsv")
    (used,) = [c for c in json.loads((root / "configs_used.json").read_text()) if c["file"] == f"{name}.tsv"]
    config = config_from_original(used["config_bert_json"], state, task_config=used["config_yaml"])
    assert config.vision_config.hidden_size == used["config_yaml"]["clip_vision_width"]
    dropped = assert_maps_strictly(state, config, MODELSCOPE[name])
    if MODELSCOPE[name] != "caption":
        assert dropped["training-only state (momentum copies, queues)"]
