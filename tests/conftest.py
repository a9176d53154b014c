"""Shared fixtures: tiny configs, the reference folder, a small vocabulary."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from transformers_mplug import MPLUGConfig, MPLUGProcessor

REPO_ROOT = Path(__file__).resolve().parents[1]
REFERENCE_DIR = Path(os.environ.get("MPLUG_REFERENCE_DIR", REPO_ROOT.parent / "shared" / "reference"))
TF52_PATH = str(Path(os.environ.get("MPLUG_TF52_PATH", REPO_ROOT / ".venv" / "tf52")).resolve())

# 104 special/unused tokens + 24 words = 128 tokens, the tiny config's vocabulary (every id a model emits decodes)
TINY_WORDS = ["what", "is", "the", "color", "of", "a", "cat", "dog", "red", "blue", "two", "how", "many", "##s"]
TINY_WORDS += ["green", "one", "three", "on", "in", "left", "right", "big", "small", "there"]


def tiny_config(**overrides) -> MPLUGConfig:
    """A fresh tiny config (hidden 32, 1-2 layers, 32 px); a new object per call (attn_implementation writes into it)."""
    args = dict(
        vision_config=dict(
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=16,
            hidden_act="quick_gelu",
        ),
        text_config=dict(
            vocab_size=128,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=40,
        ),
        cross_modal_layer_types=["co_attention", "connected_attention", "co_attention"],
        num_decoder_layers=1,
        bos_token_id=101 % 128,
        eos_token_id=102 % 128,
    )
    args.update(overrides)
    return MPLUGConfig(**args)


def fit_fixed_batch(model: torch.nn.Module, batch: dict, labels: torch.Tensor, steps: int = 40) -> list[float]:
    """The losses of `steps` AdamW steps (lr 5e-3) of `model` on one fixed batch."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    losses = []
    for _ in range(steps):
        loss = model(**batch, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    return losses


def tiny_inputs(config: MPLUGConfig, batch_size: int = 3, seed: int = 0, padded: bool = True) -> dict:
    generator = torch.Generator().manual_seed(seed)
    size = config.vision_config.image_size
    length = 7
    input_ids = torch.randint(3, config.text_config.vocab_size, (batch_size, length), generator=generator)
    input_ids[:, 0] = config.bos_token_id
    attention_mask = torch.ones_like(input_ids)
    if padded:
        for row in range(1, batch_size):
            keep = max(2, length - 2 * row)
            attention_mask[row, keep:] = 0
            input_ids[row, keep:] = config.pad_token_id
    return {
        "pixel_values": torch.randn(batch_size, 3, size, size, generator=generator),
        "input_ids": input_ids,
        "attention_mask": attention_mask,
    }


@pytest.fixture
def vocab_file(tmp_path: Path) -> Path:
    """A bert-base-uncased-shaped vocabulary: [PAD], [unused0..98], [UNK], [CLS], [SEP], [MASK], then words."""
    tokens = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"] + TINY_WORDS
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(tokens) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def processor(vocab_file: Path) -> MPLUGProcessor:
    return MPLUGProcessor.from_vocab_file(vocab_file, image_size=32)


def require_reference(*parts: str) -> Path:
    path = REFERENCE_DIR.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"reference fixtures not found at {path} (set MPLUG_REFERENCE_DIR to the shared/reference folder)")
    return path


@pytest.fixture
def shapes_vocab_file(tmp_path: Path) -> Path:
    """The vocabulary of the embedded shapes dataset in a bert-base-uncased-shaped file."""
    from transformers_mplug.data import shapes_vocabulary

    tokens = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    path = tmp_path / "shapes_vocab.txt"
    path.write_text("\n".join(tokens + shapes_vocabulary()) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def shapes_processor(shapes_vocab_file: Path) -> MPLUGProcessor:
    return MPLUGProcessor.from_vocab_file(shapes_vocab_file, image_size=32)


@pytest.fixture(scope="session")
def deepspeed_launch(tmp_path_factory) -> tuple[list[str], dict[str, str]]:
    """The `accelerate launch` prefix (CPU DeepSpeed config, 2 processes, a free port) and the environment for it.

    DeepSpeed JIT-builds its shared-memory communication op on CPU under a file lock in the torch extensions folder;
    a process killed while holding that lock makes every later build wait forever. The tests therefore build the op
    once, in a folder of their own, before any launch."""
    extensions = tmp_path_factory.mktemp("torch_extensions")
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "TORCH_EXTENSIONS_DIR": str(extensions),
    }
    build = subprocess.run(
        [sys.executable, "-c", "from deepspeed.comm.torch import build_shm_op; build_shm_op()"],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    if build.returncode != 0:
        pytest.fail(f"building DeepSpeed's CPU communication op failed:\n{build.stderr[-3000:]}")

    def command() -> list[str]:
        return accelerate_launch_prefix("accelerate_cpu_deepspeed.yaml")

    return command, env


def accelerate_launch_prefix(config_name: str, num_processes: int = 2) -> list[str]:
    """`accelerate launch --config_file examples/configs/<config_name> --num_processes N` on a free port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = REPO_ROOT / "examples" / "configs" / config_name
    accelerate = Path(sys.executable).parent / "accelerate"
    return [str(accelerate), "launch", "--config_file", str(config), "--num_processes", str(num_processes)] + [
        "--main_process_port",
        str(port),
    ]


@pytest.fixture
def cpu_launch():
    """Run a script under `accelerate launch` with 2 CPU processes without DeepSpeed (gloo, a free port):
    `cpu_launch(script, *args, cwd=...)` returns the finished process, failing the test with its output if it
    failed."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}

    def launch(script: str | Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
        command = [*accelerate_launch_prefix("accelerate_cpu_multiprocess.yaml"), str(script), *args]
        result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=cwd, env=env)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
        return result

    return launch
