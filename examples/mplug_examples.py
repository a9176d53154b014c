"""Helpers shared by the example scripts (`run_*.py`): argument parsing with the CPU-bf16 fix, CPU/DeepSpeed process
setup, image columns from files, the embedded demo's vocabulary and fresh model config, and the training plot."""

from __future__ import annotations

import copy
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import GenerationConfig, HfArgumentParser, Trainer, TrainingArguments

from transformers_mplug import DECODING_MODES, MPLUGConfig, MPLUGProcessor
from transformers_mplug.data import shapes_vocabulary

logger = logging.getLogger(__name__)

COMMON_DEFAULTS = [
    "--save_strategy",
    "no",
    "--report_to",
    "none",
    "--dataloader_num_workers",
    "0",
    "--seed",
    "0",
    "--logging_steps",
    "10",
]


def parse_with_defaults(dataclass_types: tuple, defaults: list[str], argv: list[str]):
    """Parse `defaults + argv` (so every flag given on the command line wins). On a machine with no accelerator
    `--use_cpu True` is added: TrainingArguments refuses bf16 on a CPU-only machine otherwise, and without it a
    multi-process CPU run sees a world size of 1 (DeepSpeed then rejects its batch sizes)."""
    parser = HfArgumentParser(dataclass_types)
    extra = []
    if not has_accelerator() and "--use_cpu" not in argv:
        extra = ["--use_cpu", "True"]
    parsed = parser.parse_args_into_dataclasses(args=COMMON_DEFAULTS + defaults + extra + argv)
    training_args = next(a for a in parsed if isinstance(a, TrainingArguments))
    training_args.remove_unused_columns = False  # the collators need the raw columns
    if training_args.gradient_checkpointing:
        training_args.gradient_checkpointing_kwargs = training_args.gradient_checkpointing_kwargs or {
            "use_reentrant": False
        }
    return parser, parsed


def has_accelerator() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return torch.cuda.is_available() or bool(mps is not None and mps.is_available())


def prepare_distributed(training_args: TrainingArguments) -> None:
    """CPU multi-process specifics: one share of the cores per rank, and the process group that ZeRO-3 needs
    before a model is built (the Trainer's DeepSpeed integration builds parameters partitioned under ZeRO-3)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    if training_args.deepspeed and not torch.distributed.is_initialized():
        import deepspeed

        warn_about_stale_extension_locks()

        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


def warn_about_stale_extension_locks(max_age_s: float = 900.0) -> list[Path]:
    """DeepSpeed JIT-builds ops (on CPU: its shared-memory communication op) under a file lock in the torch
    extensions folder; a process killed while holding it leaves the lock behind and every later run waits on it
    forever. Name such old locks before they stall the run."""
    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    stale = [lock for lock in root.glob("*/*/lock") if time.time() - lock.stat().st_mtime > max_age_s]
    for lock in stale:
        logger.warning(
            "Found the build lock %s, %.0f min old. If no other process is building this op, delete the file: "
            "DeepSpeed waits for it to disappear before loading the op.",
            lock,
            (time.time() - lock.stat().st_mtime) / 60,
        )
    return stale


def start_run(training_args: TrainingArguments) -> None:
    """What every script does first: the CPU/DeepSpeed process setup, logging, and the seed."""
    import transformers

    prepare_distributed(training_args)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity_warning()
    transformers.set_seed(training_args.seed)


def finish_distributed() -> None:
    """Wait for every rank, then close the process group: a rank that exits while another still holds the group
    can abort at interpreter shutdown ("terminate called without an active exception")."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


@dataclass
class DemoDataArguments:
    """The data arguments every script has; each script's `DataArguments` adds its columns and lengths."""

    dataset_name: str | None = field(default=None)
    train_file: str | None = field(default=None)
    validation_file: str | None = field(default=None)
    annotation_format: str = field(default="columns", metadata={"help": "'columns' or the task's original format"})
    image_root: str | None = field(default=None)
    num_train_examples: int = field(default=2000, metadata={"help": "embedded dataset size"})
    num_eval_examples: int = field(default=200)


def demo_defaults(
    name: str,
    epochs: int,
    learning_rate: str,
    train_batch_size: int = 32,
    warmup_steps: int = 20,
    eval_strategy: str = "epoch",
) -> list[str]:
    """A script's demo training arguments (what it runs with no arguments on the embedded data); the command line
    overrides any of them."""
    return [
        "--output_dir",
        f"outputs/{name}",
        "--num_train_epochs",
        str(epochs),
        "--per_device_train_batch_size",
        str(train_batch_size),
        "--per_device_eval_batch_size",
        "64",
        "--learning_rate",
        learning_rate,
        "--weight_decay",
        "0.02",
        "--warmup_steps",
        str(warmup_steps),
        "--lr_scheduler_type",
        "cosine",
        "--eval_strategy",
        eval_strategy,
    ]


def load_image_column(dataset, column: str, image_root: str | None):
    """Turn a column of image paths into images (under `image_root`), failing with the row that is unreadable."""
    import datasets
    from PIL import Image

    if column not in dataset.column_names:
        raise ValueError(f"Column `{column}` not found; columns are {dataset.column_names} (set --image_column).")
    if isinstance(dataset.features[column], datasets.Image):
        return dataset
    root = Path(image_root or ".")
    for index, name in enumerate(dataset[column]):
        path = root / str(name)
        try:
            with Image.open(path) as image:
                image.verify()
        except Exception as error:  # noqa: BLE001 - report which row is broken, whatever PIL raised
            raise ValueError(f"Row {index}: cannot read image {path} ({type(error).__name__}: {error}).") from None
    dataset = dataset.map(lambda row: {column: str(root / str(row[column]))})
    return dataset.cast_column(column, datasets.Image())


def image_keys(dataset, column: str) -> list[str]:
    """One key per row, equal for rows that show the same image: a hash of its encoded bytes, else its file path (an
    image column is read without decoding its images); other columns' values are hashed as they are."""
    import hashlib

    import datasets
    import numpy as np

    if isinstance(dataset.features[column], datasets.Image):
        rows = dataset.cast_column(column, datasets.Image(decode=False))[column]
        return [
            "sha1:" + hashlib.sha1(row["bytes"]).hexdigest() if row.get("bytes") else f"path:{row['path']}"
            for row in rows
        ]
    keys = []
    for value in dataset[column]:
        if isinstance(value, (str, os.PathLike)):
            keys.append(f"path:{value}")
        elif hasattr(value, "tobytes") and hasattr(value, "mode"):  # a PIL image
            keys.append("sha1:" + hashlib.sha1(f"{value.mode}{value.size}".encode() + value.tobytes()).hexdigest())
        else:
            array = np.asarray(value)
            keys.append("sha1:" + hashlib.sha1(f"{array.dtype}{array.shape}".encode() + array.tobytes()).hexdigest())
    return keys


def group_rows_by_image(keys: list[str]) -> list[list[int]]:
    """Row indices grouped by image key, groups in order of first appearance."""
    groups: dict[str, list[int]] = {}
    for row, key in enumerate(keys):
        groups.setdefault(key, []).append(row)
    return list(groups.values())


def evaluation_rank_and_world_size() -> tuple[int, int]:
    """The rank and process count that evaluation work is split over: the process group's, except under DeepSpeed
    ZeRO-3, whose forward passes every rank takes together (each rank then evaluates everything: `(0, 1)`)."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    from transformers_mplug.training import rank_and_world_size

    return (0, 1) if is_deepspeed_zero3_enabled() else rank_and_world_size()


def share_of_groups(groups: list[list[int]], rank: int, world_size: int) -> list[list[int]]:
    """This rank's contiguous share of `groups`, balanced by rows and never splitting a group (an image's questions
    stay on one rank): a group goes to the rank whose even row share holds its first row."""
    from transformers_mplug.training import shard_bounds

    start, stop = shard_bounds(sum(len(g) for g in groups), rank, world_size)
    share, first = [], 0
    for group in groups:
        if start <= first < stop:
            share.append(group)
        first += len(group)
    return share


def load_task_data(
    data_args,
    required_columns,
    embedded,
    image_columns=("image",),
    annotation_rows=None,
    annotation_format: str | None = None,
):
    """A task's DatasetDict: `--dataset_name` (Hub/local dataset), `--train_file/--validation_file` (JSON/CSV rows, or
    the original annotation format `annotation_format` read by `annotation_rows(path) -> rows`; image paths in
    `image_columns` decoded under `--image_root`), else `embedded()` (the offline demo data); then
    [`with_validation_split`] checks `required_columns`."""
    import datasets

    if getattr(data_args, "dataset_name", None):
        raw = datasets.load_dataset(data_args.dataset_name)
    elif data_args.train_file:
        files = {"train": data_args.train_file}
        if data_args.validation_file:
            files["validation"] = data_args.validation_file
        if annotation_rows is not None and getattr(data_args, "annotation_format", None) == annotation_format:
            raw = datasets.DatasetDict({k: datasets.Dataset.from_list(annotation_rows(v)) for k, v in files.items()})
        else:
            kind = "csv" if data_args.train_file.endswith(".csv") else "json"
            raw = datasets.load_dataset(kind, data_files=files)
        for column in image_columns:
            raw = datasets.DatasetDict({k: load_image_column(v, column, data_args.image_root) for k, v in raw.items()})
    else:
        raw = embedded()
    return with_validation_split(raw, required_columns)


def demo_processor(output_dir: Path, image_size: int, vocab_path: str | None = None) -> MPLUGProcessor:
    """A processor from `vocab_path`, or from a bert-base-uncased-shaped vocabulary with the embedded dataset's
    words (written to `output_dir/vocab.txt`)."""
    if vocab_path is None:
        output_dir.mkdir(parents=True, exist_ok=True)
        tokens = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        vocab_path = output_dir / "vocab.txt"
        # every rank writes the same file: write a private copy, then rename it into place in one step, so that no
        # rank ever reads a half-written vocabulary
        private = output_dir / f".vocab.txt.{os.getpid()}"
        private.write_text("\n".join(tokens + shapes_vocabulary()) + "\n", encoding="utf-8")
        os.replace(private, vocab_path)
    return MPLUGProcessor.from_vocab_file(vocab_path, image_size=image_size)


def demo_config(
    vocab_size: int,
    image_size: int = 64,
    patch_size: int = 8,
    vision_width: int = 128,
    vision_layers: int = 4,
    text_width: int = 128,
    text_layers: int = 2,
    cross_modal_layers: int = 4,
    decoder_layers: int = 2,
    attention_head_size: int = 64,
    **kwargs,
) -> MPLUGConfig:
    """A small mPLUG for the embedded dataset (no dropout; connected attention every layer after the first)."""
    return MPLUGConfig(
        vision_config=dict(
            hidden_size=vision_width,
            intermediate_size=4 * vision_width,
            num_hidden_layers=vision_layers,
            num_attention_heads=max(1, vision_width // attention_head_size),
            image_size=image_size,
            patch_size=patch_size,
            attention_dropout=0.0,
        ),
        text_config=dict(
            vocab_size=vocab_size,
            hidden_size=text_width,
            num_hidden_layers=text_layers,
            num_attention_heads=max(1, text_width // attention_head_size),
            intermediate_size=4 * text_width,
            max_position_embeddings=64,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        ),
        num_cross_modal_layers=cross_modal_layers,
        connected_attention_stride=1,
        num_decoder_layers=decoder_layers,
        vision_projection_dropout=0.0,
        **kwargs,
    )


def plot_curves(log_history: list[dict], metric: str, title: str, path: Path, ylim: tuple | None = (0, 1)) -> None:
    """Training loss against steps and an evaluation metric (`eval_<metric>`) on a second axis, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [e["step"] for e in log_history if "loss" in e]
    losses = [e["loss"] for e in log_history if "loss" in e]
    key = f"eval_{metric}"
    eval_steps = [e["step"] for e in log_history if key in e]
    values = [e[key] for e in log_history if key in e]
    figure, left = plt.subplots(figsize=(7, 4))
    left.plot(steps, losses, color="tab:blue", label="training loss")
    left.set_xlabel("step")
    left.set_ylabel("loss", color="tab:blue")
    right = left.twinx()
    right.plot(eval_steps, values, "o-", color="tab:orange", label=metric)
    right.set_ylabel(metric, color="tab:orange")
    if ylim is not None:
        right.set_ylim(*ylim)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def unset_deepspeed_for_inference() -> None:
    """After a ZeRO-3 run, load saved folders as plain checkpoints (not into the training's partitioning)."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()


@torch.no_grad()
def retrieval_evaluation(
    model, processor, dataset, image_column: str, text_column: str, k: int = 16, image_id_column: str | None = None
) -> dict:
    """Recall@1/5/10 both ways over a gallery made of `dataset` through `model.retrieve` (ITC top-`k` re-ranked by
    ITM), and the same for the ITC ranking alone (`itc_*`).

    The gallery holds each distinct image once (rows showing the same image, e.g. its several captions, share it:
    equal `image_id_column` values, else equal `image_keys`) and each distinct text once (a text repeated on rows of
    different images keeps its first row's image as its truth; an image left without texts leaves the gallery). An
    image's truth is all its texts. With several processes the encoding and re-ranking are split across them
    (`retrieve(distributed=True)`; see [`evaluation_rank_and_world_size`])."""
    from transformers_mplug.metrics import retrieval_recall

    texts, text_rows, seen = [], [], set()
    for row, text in enumerate(dataset[text_column]):
        if text not in seen:
            seen.add(text)
            texts.append(text)
            text_rows.append(row)
    kept = set(text_rows)  # an image all of whose texts repeat other images' texts leaves the gallery with them
    if image_id_column:
        keys = [str(value) for value in dataset[image_id_column]]
    else:
        keys = image_keys(dataset, image_column)
    groups = [g for g in group_rows_by_image(keys) if kept.intersection(g)]
    image_of_row = {row: image for image, group in enumerate(groups) for row in group}
    truth_t2i = [image_of_row[row] for row in text_rows]
    truth_i2t = [[] for _ in groups]
    for text_index, image in enumerate(truth_t2i):
        truth_i2t[image].append(text_index)
    images = [dataset[group[0]][image_column] for group in groups]
    model.eval()
    inputs = {"pixel_values": processor(images=images)["pixel_values"], **processor(text=texts)}
    inputs = {name: value.to(model.device) for name, value in inputs.items()}
    distributed = evaluation_rank_and_world_size()[1] > 1
    result = model.retrieve(**inputs, k=min(k, len(texts), len(images)), distributed=distributed)
    scores_i2t = torch.full(result.similarity.shape, float("-inf"))
    scores_i2t.scatter_(1, result.image_to_text_indices.cpu(), result.image_to_text_scores.float().cpu())
    scores_t2i = torch.full(result.similarity.t().shape, float("-inf"))
    scores_t2i.scatter_(1, result.text_to_image_indices.cpu(), result.text_to_image_scores.float().cpu())
    # ground truth outside the ITC top-k keeps -inf: it ranks after every re-ranked candidate
    recall = retrieval_recall(scores_i2t, scores_t2i, truth_t2i, truth_i2t)
    # the ITC ranking alone, before the ITM re-ranking
    similarity = result.similarity.float().cpu()
    itc = retrieval_recall(similarity, similarity.t(), truth_t2i, truth_i2t)
    recall.update({f"itc_{k}": v for k, v in itc.items()})
    recall["gallery_size"] = len(images)
    recall["gallery_texts"] = len(texts)
    return recall


@dataclass
class DemoModelArguments:
    """A converted/saved folder (`--model_name_or_path`), or the sizes of a fresh small model (the embedded demos).
    The scripts subclass it with their own options."""

    model_name_or_path: str | None = field(default=None, metadata={"help": "a converted/saved mPLUG folder"})
    vocab_path: str | None = field(default=None, metadata={"help": "WordPiece vocab.txt of a fresh model"})
    image_size: int = field(default=64, metadata={"help": "resolution of a fresh model"})
    patch_size: int = field(default=8)
    vision_width: int = field(default=128)
    vision_layers: int = field(default=4)
    text_width: int = field(default=128)
    text_layers: int = field(default=2)
    cross_modal_layers: int = field(default=2)
    decoder_layers: int = field(default=2)
    attention_head_size: int = field(default=64, metadata={"help": "width of one attention head of a fresh model"})

    def fresh_config(self, vocab_size: int, **overrides) -> MPLUGConfig:
        """[`demo_config`] with these sizes."""
        sizes = ("image_size", "patch_size", "vision_width", "vision_layers", "text_width", "text_layers")
        sizes += ("cross_modal_layers", "decoder_layers", "attention_head_size")
        return demo_config(vocab_size, **{name: getattr(self, name) for name in sizes}, **overrides)


def evaluation_decoding(
    model,
    decoding_mode: str,
    num_beams: int,
    max_new_tokens: int | None = None,
    min_new_tokens: int | None = None,
) -> GenerationConfig:
    """The model's generation config with the decoding the script evaluates with (`decoding_mode`, beams, lengths;
    `None` keeps the model's value). The scripts install it as `model.generation_config`, so that the evaluation, the
    saved `generation_config.json` and the pipelines of the saved folder decode the same way."""
    if decoding_mode not in DECODING_MODES:
        raise ValueError(f"--eval_decoding_mode must be one of {list(DECODING_MODES)}, got {decoding_mode!r}.")
    config = copy.deepcopy(model.generation_config)
    config.decoding_mode = decoding_mode
    config.num_beams = num_beams
    if max_new_tokens is not None:
        config.max_new_tokens = max_new_tokens
    if min_new_tokens is not None:
        config.min_new_tokens = min_new_tokens
    if config.min_new_tokens is not None and config.max_new_tokens is not None:
        if config.min_new_tokens > config.max_new_tokens:
            raise ValueError(
                f"--min_new_tokens ({config.min_new_tokens}) exceeds --max_new_tokens ({config.max_new_tokens})."
            )
    return config


def with_validation_split(raw, required_columns):
    """A `validation` split (10 % of `train`, seeded) when the data has none, and a check that every split holds the
    `required_columns` (naming the missing one)."""
    import datasets

    if "validation" not in raw:
        split = raw["train"].train_test_split(test_size=0.1, seed=0)
        raw = datasets.DatasetDict({"train": split["train"], "validation": split["test"]})
    for name, part in raw.items():
        for column in required_columns:
            if column is not None and column not in part.column_names:
                raise ValueError(f"The {name} split has no `{column}` column (columns: {part.column_names}).")
    return raw


def read_caption_annotations(path: str) -> list[tuple[str, list[str]]]:
    """The original caption/retrieval annotations, `[{"image": path, "caption": str | [str, ...]}]`, as
    `(image, captions)` pairs; fails naming the entry that lacks a key or holds an empty caption."""
    import json

    with open(path, encoding="utf-8") as handle:
        annotations = json.load(handle)
    entries = []
    for index, item in enumerate(annotations):
        for key in ("image", "caption"):
            if key not in item:
                raise ValueError(f"{path}, entry {index}: missing `{key}`.")
        captions = item["caption"] if isinstance(item["caption"], list) else [item["caption"]]
        if not captions or not all(isinstance(c, str) and c.strip() for c in captions):
            raise ValueError(f"{path}, entry {index}: `caption` must hold non-empty strings.")
        entries.append((item["image"], captions))
    return entries


def accuracy_metrics(prediction) -> dict[str, float]:
    """`compute_metrics` of the classification scripts: accuracy of the argmax of the logits."""
    import numpy as np

    logits = prediction.predictions
    logits = logits[0] if isinstance(logits, tuple) else logits
    return {"accuracy": float((np.argmax(logits, axis=-1) == prediction.label_ids).mean())}


class LossComponentsTrainer(Trainer):
    """A Trainer that also logs the model output's `loss_components` (e.g. `loss_itc`, `loss_itm`), averaged over
    the training steps since the last log."""

    loss_components: tuple[str, ...] = ()

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._components: dict[str, list[float]] = {}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if model.training:
            for name in self.loss_components:
                value = outputs.get(name) if hasattr(outputs, "get") else None
                if value is not None:
                    self._components.setdefault(name, []).append(float(value.detach()))
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs:
            for name, values in self._components.items():
                logs[name] = round(sum(values) / len(values), 4)
            self._components = {}
        super().log(logs, *args, **kwargs)
