"""Run under `accelerate launch` (2 CPU processes, gloo) by test_retrieval.py: `MPLUGForRetrieval.retrieve` with
`distributed=True` (each rank encodes and re-ranks its share, the shares gathered) against the same call on one
process, on every rank; galleries with shares of unequal size and with fewer images than ranks."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from accelerate import PartialState

from transformers_mplug import MPLUGConfig, MPLUGForRetrieval

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: tests.conftest's tiny config
from tests.conftest import tiny_config  # noqa: E402


def config() -> MPLUGConfig:
    return tiny_config(projection_dim=16)  # schedule [co, connected, co]: shared and per-pair layers


def main(output_dir: str) -> None:
    state = PartialState(cpu=True)
    torch.manual_seed(0)
    model = MPLUGForRetrieval(config()).eval()
    generator = torch.Generator().manual_seed(1)
    report = {"rank": state.process_index, "world_size": state.num_processes, "cases": []}
    for num_images, num_texts, k, batch_size in ((5, 7, 4, 3), (1, 3, 2, 2), (4, 4, 8, 64)):
        pixel_values = torch.randn(num_images, 3, 32, 32, generator=generator)
        ids = torch.randint(110, 128, (num_texts, 6), generator=generator)
        ids[:, 0] = 101
        mask = torch.ones_like(ids)
        mask[::2, -2:] = 0  # padded texts
        with torch.no_grad():
            one = model.retrieve(pixel_values, ids, mask, k=k, batch_size=batch_size)
            two = model.retrieve(pixel_values, ids, mask, k=k, batch_size=batch_size, distributed=True)
        report["cases"].append(
            {
                "gallery": [num_images, num_texts],
                "max_abs_diff": max(float((getattr(one, f) - getattr(two, f)).abs().max()) for f in SCORES),
                "indices_equal": all(torch.equal(getattr(one, f), getattr(two, f)) for f in INDICES),
            }
        )
    with open(f"{output_dir}/retrieve_rank{state.process_index}.json", "w") as handle:
        json.dump(report, handle)
    state.wait_for_everyone()
    torch.distributed.destroy_process_group()


SCORES = ("similarity", "image_to_text_scores", "text_to_image_scores")
INDICES = ("image_to_text_indices", "text_to_image_indices")

if __name__ == "__main__":
    main(sys.argv[1])
