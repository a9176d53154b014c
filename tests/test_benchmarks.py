"""benchmarks/benchmark_mplug.py runs every section and writes its table, JSON and plot (tiny sizes; no timing is
asserted: speed targets live in the benchmark's own output)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from .conftest import REPO_ROOT


def test_benchmark_script_writes_every_section(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "benchmarks" / "benchmark_mplug.py"),
            "--size",
            "tiny",
            "--repeats",
            "1",
            "--batch_size",
            "2",
            "--train_batch_size",
            "2",
            "--num_candidates",
            "64",
            "--galleries",
            "20",
            "40",
            "--no_bf16",
            "--output_dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    models = {row["model"] for row in results["generate"]}
    assert {"BLIP (transformers)", "mPLUG sdpa", "mPLUG eager", "mPLUG sdpa, no KV cache"} <= models
    decoding = [(row["call"], row["decoding_mode"], row["batch"]) for row in results["decoding"]]
    assert decoding == [
        (call, mode, batch)
        for batch in (1, 2)
        for call in ("generate", "generate, image_embeds given")
        for mode in ("transformers", "original")
    ]
    floor = [(row["batch"], row["call"]) for row in results["floor"]]
    calls = ("encoders", "greedy", "beam 5, original", "beam 5, transformers")
    assert floor == [(batch, call) for batch in (1, 2) for call in calls]
    assert all(row["floor"] > 0 for row in results["floor"] if row["call"] != "encoders")
    assert [row["call"].split()[0] for row in results["rank"]] == ["generate", "rank_answers", "rank_answers"]
    assert [row["layers"] for row in results["schedules"]][:2] == ["cC", "cc"]
    assert all(row["gflops"] > 0 for row in results["schedules"])
    assert [row["gradient_checkpointing"] for row in results["training"]] == [False, True]
    assert [row["gallery"] for row in results["retrieval"]] == [20, 40]
    assert results["parameters"]["parameters"] > 0 and results["parameters"]["resident_gb"] > 0
    assert (tmp_path / "results.png").stat().st_size > 1000
    assert "### 6. Parameters" in result.stdout


def test_evaluation_benchmark_pipeline_section(tmp_path):
    """benchmarks/benchmark_evaluation.py's pipeline section at the tiny size: the batched pipeline agrees with one
    call per question (its retrieval section runs run_retrieval.py as test_task_scripts' 2-process test does)."""
    result = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "benchmarks" / "benchmark_evaluation.py"),
            "--size",
            "tiny",
            "--questions",
            "8",
            "--batch_size",
            "4",
            "--sections",
            "pipeline",
            "--output_dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO_ROOT / "benchmarks",
        env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((tmp_path / "evaluation.json").read_text())
    assert [row["images x questions"] for row in results["pipeline"]] == ["2 x 4", "8 x 1"]
    assert all(row["answers_agree"] == 1 for row in results["pipeline"])
    assert "| 2 x 4 |" in result.stdout
