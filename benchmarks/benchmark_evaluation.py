#!/usr/bin/env python
"""Batched and multi-process evaluation, measured in one run (random weights; prints markdown tables, writes JSON).

1. `pipeline("visual-question-answering")` over 64 questions: `batch_size=16` against one call per question, for
   16 images x 4 questions (as VQA v2, about 5 questions per image: each image is encoded once per batch) and for
   64 images x 1 question. Original beam search, 5 beams, 5 new tokens forced; the answers must agree.
2. `examples/run_retrieval.py --eval_only` on the embedded data: 2 processes (`accelerate launch --config_file
   examples/configs/accelerate_cpu_multiprocess.yaml --num_processes 2`) against 1, the evaluation time reported by
   the script (`eval_seconds`: encoding, ITC, ITM re-rank; process start-up excluded).

    python benchmarks/benchmark_evaluation.py                    # base size for section 1, a few minutes on 2 cores
    python benchmarks/benchmark_evaluation.py --size tiny        # a smoke run
    python benchmarks/benchmark_evaluation.py --sections pipeline   # only section 1
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from benchmark_mplug import SIZES, mplug_config, table
from PIL import Image
from transformers import pipeline

import transformers_mplug  # noqa: F401 - registers the task
from transformers_mplug import MPLUGForQuestionAnswering, MPLUGProcessor

REPO_ROOT = Path(__file__).resolve().parents[1]
DECODING = dict(decoding_mode="original", num_beams=5, min_new_tokens=5, max_new_tokens=5)


def vocabulary(folder: Path, size: int = 30522) -> Path:
    """A bert-base-uncased-shaped vocabulary (special tokens at their ids) of made-up words."""
    words = [f"w{i}" for i in range(size - 104)]
    path = folder / "vocab.txt"
    tokens = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words
    path.write_text("\n".join(tokens) + "\n", encoding="utf-8")
    return path


def bench_pipeline(size: dict, questions: int, batch_size: int) -> list[dict]:
    torch.manual_seed(0)
    model = MPLUGForQuestionAnswering(mplug_config(size)).eval()
    with tempfile.TemporaryDirectory() as folder:
        processor = MPLUGProcessor.from_vocab_file(vocabulary(Path(folder)), image_size=size["image"])
    vqa = pipeline("visual-question-answering", model=model, processor=processor)
    rng = random.Random(0)
    texts = [" ".join(f"w{rng.randrange(30000)}" for _ in range(rng.randint(4, 12))) for _ in range(questions)]
    rows = []
    for num_images in (questions // 4, questions):
        pixels = np.random.default_rng(0).integers(0, 256, (num_images, size["image"], size["image"], 3), np.uint8)
        images = [Image.fromarray(p) for p in pixels]
        pairs = [images[i * num_images // questions] for i in range(questions)]  # an image's questions are adjacent
        vqa(pairs[0], texts[0], **DECODING)  # warm-up
        start = time.perf_counter()
        single = [vqa(image, text, **DECODING) for image, text in zip(pairs, texts)]
        one_by_one = time.perf_counter() - start
        start = time.perf_counter()
        batched = vqa(pairs, texts, batch_size=batch_size, **DECODING)
        batched_seconds = time.perf_counter() - start
        agree = sum(b[0]["answer"] == s[0]["answer"] for b, s in zip(batched, single)) / questions
        rows.append(
            {
                "images x questions": f"{num_images} x {questions // num_images}",
                "one_by_one_s": one_by_one,
                f"batch_size={batch_size}_s": batched_seconds,
                "questions_per_s_batched": questions / batched_seconds,
                "speedup": one_by_one / batched_seconds,
                "answers_agree": agree,
            }
        )
    return rows


def run_script(command: list[str], env: dict) -> None:
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO_ROOT)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-4000:]}")


def bench_retrieval_processes(eval_examples: int) -> list[dict]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("OMP_NUM_THREADS", None)  # each rank takes its share of the cores (mplug_examples.prepare_distributed)
    script = str(REPO_ROOT / "examples" / "run_retrieval.py")
    data = ["--num_eval_examples", str(eval_examples)]
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        trained = Path(folder) / "trained"
        run_script([sys.executable, script, "--output_dir", str(trained), "--max_steps", "1", *data], env)
        evaluation = ["--model_name_or_path", str(trained), "--eval_only", *data]
        launch = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file"]
        launch += [str(REPO_ROOT / "examples" / "configs" / "accelerate_cpu_multiprocess.yaml"), "--num_processes"]
        results = {}
        for processes in (1, 2):
            out = Path(folder) / f"eval{processes}"
            prefix = [sys.executable] if processes == 1 else [*launch, str(processes)]
            run_script([*prefix, script, "--output_dir", str(out), *evaluation], env)
            results[processes] = json.loads((out / "metrics.json").read_text())
        for processes, metrics in results.items():
            rows.append(
                {
                    "processes": processes,
                    "gallery (images)": metrics["eval_gallery_size"],
                    "eval_seconds": metrics["eval_seconds"],
                    "speedup": results[1]["eval_seconds"] / metrics["eval_seconds"],
                    "txt_r1": metrics["eval_txt_r1"],
                    "img_r1": metrics["eval_img_r1"],
                }
            )
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="base")
    parser.add_argument("--questions", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--retrieval_eval_examples", type=int, default=200)
    parser.add_argument("--sections", nargs="+", choices=["pipeline", "retrieval"], default=["pipeline", "retrieval"])
    parser.add_argument("--output_dir", default="outputs/benchmarks")
    args = parser.parse_args(argv)
    results = {"size": args.size, "threads": torch.get_num_threads(), "torch": torch.__version__}
    if "pipeline" in args.sections:
        print(f"### 1. VQA pipeline, {args.questions} questions, {args.size} size\n", flush=True)
        results["pipeline"] = bench_pipeline(SIZES[args.size], args.questions, args.batch_size)
        print(f"\n{table(results['pipeline'])}\n", flush=True)
    if "retrieval" in args.sections:
        print("### 2. run_retrieval.py evaluation, 2 processes vs 1\n", flush=True)
        results["retrieval_processes"] = bench_retrieval_processes(args.retrieval_eval_examples)
        print(table(results["retrieval_processes"]))
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    (output / "evaluation.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    print(f"\nwrote {output / 'evaluation.json'}")
    return results


if __name__ == "__main__":
    main()
