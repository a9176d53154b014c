#!/usr/bin/env python
"""Peak resident memory and time of the converter on a checkpoint of real size, built for the measurement.

The checkpoint is written from a full-size key listing (`shared/reference/keys/<model>.tsv`, every key of the
released file at its real shape) with random weights: an AliceMind `{'model': ...}` file, or with `--layout
modelscope` a ModelScope folder (`model.`-prefixed keys, configuration.json, config.yaml, config_bert.json,
vocab.txt). The converter then runs in a fresh process (`--verify` optionally), and its peak resident set size
(`ru_maxrss` of the child) is reported against the checkpoint's size.

    python benchmarks/benchmark_conversion_memory.py --listing vqa_base            # 3.9 GB, about 2 minutes
    python benchmarks/benchmark_conversion_memory.py --listing vqa_base --verify
    python benchmarks/benchmark_conversion_memory.py --listing vqa_base --layout modelscope
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
REFERENCE = Path(os.environ.get("MPLUG_REFERENCE_DIR", REPO_ROOT.parent / "shared" / "reference"))
CONVERTER = REPO_ROOT / "conversion" / "convert_mplug_original_to_hf.py"
# run a script as __main__ and print its peak resident set size (VmHWM) when it exits
PEAK_REPORTER = """
import atexit, runpy, sys
def report():
    with open("/proc/self/status") as status:
        peak = [line.split()[1] for line in status if line.startswith("VmHWM")][0]
    sys.stderr.write(f"MPLUG_PEAK_KB {peak}\\n")
atexit.register(report)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""
TASKS = {"vqa": "visual-question-answering", "caption": "image-captioning", "retrieval": "image-text-retrieval"}


def read_listing(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def random_state_dict(rows: list[dict[str, str]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Tensors of the listed shapes: floats N(0, 0.02), integer buffers zero, tied keys one tensor."""
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for row in rows:
        if row.get("same_tensor_as") and row["same_tensor_as"] in state:
            state[row["key"]] = state[row["same_tensor_as"]]
            continue
        shape = [int(n) for n in row["shape"].split("x")] if row["shape"] not in ("", "scalar") else []
        dtype = getattr(torch, row["dtype"])
        if dtype.is_floating_point:
            tensor = torch.empty(shape, dtype=dtype).normal_(0, 0.02, generator=generator)
        else:
            tensor = torch.zeros(shape, dtype=dtype)
        if row["key"].endswith("position_ids"):
            tensor = torch.arange(shape[-1]).expand(shape).clone()
        state[row["key"]] = tensor
    if "temp" in state:
        state["temp"] = torch.tensor(0.07)
    return state


def write_vocab(path: Path, size: int) -> None:
    tokens = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens += [f"w{i}" for i in range(size - len(tokens))]
    path.write_text("\n".join(tokens) + "\n", encoding="utf-8")


def build(listing: str, layout: str, folder: Path) -> tuple[list[str], Path]:
    """Write the checkpoint (and its configs) under `folder`; return the converter arguments and the weights file."""
    rows = read_listing(REFERENCE / "keys" / f"{listing}.tsv")
    summary = json.loads((REFERENCE / "keys" / "summary.json").read_text())[listing]
    task = listing.split("_")[0].replace("videoqa", "vqa").replace("videocap", "caption")
    state = random_state_dict(rows)
    vocab_size = state[
        "text_decoder.bert.embeddings.word_embeddings.weight"
        if task != "retrieval"
        else "text_encoder.embeddings.word_embeddings.weight"
    ].shape[0]
    yaml_text = f"image_res: {summary['image_res']}\nbeam_size: 5\nmin_length: 1\nmax_length: 10\n"
    if layout == "alicemind":
        weights = folder / "checkpoint.pth"
        torch.save({"model": state}, weights)
        write_vocab(folder / "vocab.txt", vocab_size)
        (folder / "task.yaml").write_text(yaml_text, encoding="utf-8")
        arguments = [
            "--task",
            task,
            "--checkpoint_path",
            str(weights),
            "--vocab_path",
            str(folder / "vocab.txt"),
            "--config_path",
            str(folder / "task.yaml"),
        ]
        return arguments, weights
    model_dir = folder / "modelscope"
    model_dir.mkdir()
    weights = model_dir / "pytorch_model.bin"
    torch.save({f"model.{key}": value for key, value in state.items()}, weights)
    write_vocab(model_dir / "vocab.txt", vocab_size)
    (model_dir / "configuration.json").write_text(
        json.dumps({"framework": "pytorch", "task": TASKS[task], "model": {"type": "mplug"}}), encoding="utf-8"
    )
    (model_dir / "config.yaml").write_text(yaml_text + "bert_config: config_bert.json\n", encoding="utf-8")
    from transformers_mplug.original_checkpoint import bert_config_from_state_dict

    bert = bert_config_from_state_dict(state)
    fusion_built = 1 + max(int(k.split(".")[3]) for k in state if k.startswith("fusion_encoder.encoder.layer."))
    bert.update(num_hidden_layers=fusion_built, fusion_layers=6)
    (model_dir / "config_bert.json").write_text(json.dumps(bert), encoding="utf-8")
    return ["--checkpoint_path", str(model_dir)], weights


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--listing", default="vqa_base", help="a key listing of shared/reference/keys")
    parser.add_argument("--layout", choices=["alicemind", "modelscope"], default="alicemind")
    parser.add_argument("--verify", action="store_true", help="also run the converter's --verify")
    parser.add_argument("--work_dir", help="where to write the checkpoint (default: a temporary folder)")
    args = parser.parse_args()
    if not (REFERENCE / "keys" / f"{args.listing}.tsv").exists():
        print(f"error: no key listing {args.listing} under {REFERENCE / 'keys'}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(dir=args.work_dir) as work:
        work = Path(work)
        start = time.perf_counter()
        arguments, weights = build(args.listing, args.layout, work)
        built = time.perf_counter() - start
        size = weights.stat().st_size
        # the converter reports its own peak (VmHWM of its process after exec): the rusage of a child also counts
        # the parent's memory at fork time, and this parent has just held the whole checkpoint
        command = [sys.executable, "-c", PEAK_REPORTER, str(CONVERTER), *arguments, "--output_dir", str(work / "out")]
        if args.verify:
            command.append("--verify")
        start = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True)
        elapsed = time.perf_counter() - start
        if result.returncode != 0:
            print(result.stdout[-2000:], result.stderr[-3000:], file=sys.stderr)
            return result.returncode
        (line,) = [line for line in result.stderr.splitlines() if line.startswith("MPLUG_PEAK_KB ")]
        peak = int(line.split()[1]) * 1024
        print("| checkpoint | layout | size | converter | peak RSS | peak / size | time |")
        print("|---|---|---|---|---|---|---|")
        print(
            f"| {args.listing} | {args.layout} | {size / 1e9:.2f} GB | {'--verify' if args.verify else 'convert'} | "
            f"{peak / 1e9:.2f} GB | {peak / size:.2f} | {elapsed:.1f} s |"
        )
        print(
            f"(checkpoint written in {built:.0f} s; output {sum(p.stat().st_size for p in (work / 'out').iterdir()) / 1e9:.2f} GB)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
