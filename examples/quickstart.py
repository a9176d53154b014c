"""Quick start: build a small mPLUG, process an image and a question, run the trunk, print what comes out.

Runs offline in seconds on a CPU (random weights; no download). Usage: `make demo` or `python examples/quickstart.py`.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor

from transformers_mplug import MPLUGConfig, MPLUGModel, MPLUGProcessor

WORDS = ["what", "is", "the", "color", "of", "shape", "red", "blue", "circle", "square", "how", "many", "##s"]


def write_vocab(folder: Path) -> Path:
    """A bert-base-uncased-shaped vocabulary with a few words (the real one is bert-base-uncased's vocab.txt)."""
    tokens = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    path = folder / "vocab.txt"
    path.write_text("\n".join(tokens) + "\n", encoding="utf-8")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--question", default="what is the color of the circle")
    args = parser.parse_args()

    torch.manual_seed(0)
    config = MPLUGConfig(
        vision_config=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=args.image_size,
            patch_size=16,
        ),
        text_config=dict(
            vocab_size=128, hidden_size=48, num_hidden_layers=2, num_attention_heads=2, intermediate_size=96
        ),
        num_cross_modal_layers=4,
        connected_attention_stride=2,
        num_decoder_layers=2,
    )
    print(f"cross-modal schedule: {config.cross_modal_layer_types}")
    model = MPLUGModel(config).eval()

    with tempfile.TemporaryDirectory() as tmp:
        processor = MPLUGProcessor.from_vocab_file(write_vocab(Path(tmp)), image_size=args.image_size)
        image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8))
        inputs = processor(images=image, text=args.question)
        print(f"input_ids: {inputs['input_ids'].tolist()}  ([CLS] question, no trailing [SEP])")
        print(f"pixel_values: {tuple(inputs['pixel_values'].shape)}")

        with torch.no_grad():
            out = model(**inputs)
        for name in (
            "vision_last_hidden_state",
            "image_embeds",
            "text_embeds",
            "fused_image_embeds",
            "fused_text_embeds",
            "last_hidden_state",
        ):
            print(f"{name:>26}: {tuple(getattr(out, name).shape)}")

        # Save and reload through the Auto classes, as a Hub folder would be used.
        folder = Path(tmp) / "mplug-tiny"
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        reloaded = AutoModel.from_pretrained(folder).eval()
        reprocessor = AutoProcessor.from_pretrained(folder)
        with torch.no_grad():
            again = reloaded(**reprocessor(images=image, text=args.question))
        error = (again.last_hidden_state - out.last_hidden_state).abs().max().item()
        print(f"reloaded from {folder.name}/ with AutoModel + AutoProcessor: max |difference| = {error:.2e}")


if __name__ == "__main__":
    main()
