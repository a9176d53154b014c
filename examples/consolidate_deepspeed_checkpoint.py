#!/usr/bin/env python
"""Turn a DeepSpeed ZeRO-2/3 Trainer checkpoint (`checkpoint-N/` with `global_stepN/` optimizer shards) into a plain
mPLUG folder with fp32 weights (the optimizer's master copy), loadable with `from_pretrained` and `pipeline(...)`.

    python examples/consolidate_deepspeed_checkpoint.py --checkpoint_dir outputs/run_vqa/checkpoint-500 \\
        --output_dir outputs/run_vqa-step500

DeepSpeed's own `zero_to_fp32.py --safe_serialization` fails on mPLUG because its decoder ties the output
projection to the word embeddings (safetensors refuses tensors that share memory); this script rebuilds the model,
restores the tied weights from their partners, loads everything strictly (a missing, unexpected or mis-shaped weight
is an error) and saves with `save_pretrained`. The processor and generation config are copied from `--processor_path`
(default: the checkpoint's parent folder, where the example scripts save them).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import transformers_mplug
from transformers_mplug import MPLUGConfig, MPLUGProcessor
from transformers_mplug.original_checkpoint import check_and_load


def consolidate(checkpoint_dir: Path, output_dir: Path, processor_path: Path | None = None, dtype: str = "float32"):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if not (checkpoint_dir / "config.json").is_file():
        raise ValueError(f"{checkpoint_dir} has no config.json: pass a Trainer checkpoint folder (checkpoint-N).")
    config = MPLUGConfig.from_pretrained(checkpoint_dir)
    architecture = (config.architectures or [None])[0]
    model_class = getattr(transformers_mplug, architecture or "", None)
    if model_class is None:
        raise ValueError(f"config.json names architecture {architecture!r}, which transformers_mplug does not define.")
    state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir))
    model = model_class(config)
    own = model.state_dict()
    # tied weights are stored once by DeepSpeed: take them from the tensor they share memory with
    by_storage: dict[int, list[str]] = {}
    for name, tensor in own.items():
        by_storage.setdefault(tensor.data_ptr(), []).append(name)
    for names in by_storage.values():
        present = [n for n in names if n in state]
        for name in names:
            if name not in state and present:
                state[name] = state[present[0]]
    check_and_load(model, state)
    if dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir)
    source = processor_path if processor_path is not None else checkpoint_dir.parent
    if (source / "processor_config.json").is_file() or (source / "preprocessor_config.json").is_file():
        MPLUGProcessor.from_pretrained(source).save_pretrained(output_dir)
    if (source / "generation_config.json").is_file():
        model.generation_config.from_pretrained(source).save_pretrained(output_dir)
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint_dir", required=True, type=Path)
    parser.add_argument("--output_dir", required=True, type=Path)
    parser.add_argument("--processor_path", type=Path, default=None)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = parser.parse_args(argv)
    try:
        model = consolidate(args.checkpoint_dir, args.output_dir, args.processor_path, args.dtype)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(
        f"Saved {type(model).__name__} ({sum(p.numel() for p in model.parameters())} parameters) to {args.output_dir}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
