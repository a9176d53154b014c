#!/usr/bin/env python
"""Fine-tune mPLUG for visual question answering with the transformers Trainer.

With no arguments it trains a small mPLUG from scratch on the embedded "shapes" dataset (offline, CPU, a few
minutes), evaluates VQA accuracy on held-out questions, saves the model, processor and generation config, writes
metrics JSON and a loss/accuracy plot, and answers held-out questions through `pipeline("visual-question-answering")`.

    accelerate launch examples/run_vqa.py                                   # the embedded demo
    accelerate launch examples/run_vqa.py --model_name_or_path mplug-base-vqa --dataset_name ... --bf16
    accelerate launch --config_file examples/configs/accelerate_cpu_deepspeed.yaml examples/run_vqa.py \\
        --deepspeed examples/configs/ds_zero2.json
    accelerate launch --config_file examples/configs/accelerate_cpu_multiprocess.yaml --num_processes 2 \\
        examples/run_vqa.py --model_name_or_path OUT --eval_only       # evaluation split across 2 processes

Evaluation generates answers with each image encoded once for all its questions; with several processes each answers
its share of the images and the answers are gathered (`eval_predictions.json` holds them in row order).

Data: `--dataset_name` (a Hub/local `datasets` dataset), `--train_file/--validation_file` (JSON/CSV with
`--image_column --question_column --answers_column [--weights_column]`, images as paths under `--image_root`), or
`--annotation_format alicemind` for the original VQA annotation JSON (`image`, `question`, `answer` list).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from mplug_examples import (
    DemoDataArguments,
    DemoModelArguments,
    demo_defaults,  # the examples folder (next to this script)
    demo_processor,
    evaluation_decoding,
    evaluation_rank_and_world_size,
    finish_distributed,
    group_rows_by_image,
    image_keys,
    load_task_data,
    parse_with_defaults,
    share_of_groups,
    start_run,
)
from transformers import Trainer, TrainingArguments, pipeline

from transformers_mplug import MPLUGForQuestionAnswering, MPLUGProcessor
from transformers_mplug.data import MPLUGVQACollator, load_shapes_dataset
from transformers_mplug.metrics import vqa_accuracy
from transformers_mplug.training import gather_objects_across_ranks

logger = logging.getLogger("run_vqa")

DEMO_DEFAULTS = demo_defaults("run_vqa", epochs=22, learning_rate="5e-4", train_batch_size=48, warmup_steps=30)


@dataclass
class ModelArguments(DemoModelArguments):
    # the embedded demo's model: one 32-px patch per cell of the 2x2 scene grid (an object's shape is then the content
    # of one patch), four fusion layers and three decoder layers; measured against 16-px patches and two decoder
    # layers, which mostly failed "where is the <colour> <shape>?" (README: the main job)
    patch_size: int = field(default=32)
    cross_modal_layers: int = field(default=4)
    decoder_layers: int = field(default=3)
    eval_num_beams: int = field(default=1, metadata={"help": "beams when scoring VQA accuracy"})
    eval_decoding_mode: str = field(
        default="original",
        metadata={"help": "'original' (the original mPLUG beam search) or 'transformers'; saved with the model"},
    )
    eval_max_new_tokens: int = field(default=5, metadata={"help": "longest generated answer when scoring"})
    eval_only: bool = field(default=False, metadata={"help": "evaluate --model_name_or_path without training"})
    vision_learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "learning rate of the vision tower (default: --learning_rate), as the "
            "original's separate lr for the visual encoder"
        },
    )


@dataclass
class DataArguments(DemoDataArguments):
    annotation_format: str = field(default="columns", metadata={"help": "'columns' or 'alicemind'"})
    image_column: str = field(default="image")
    question_column: str = field(default="question")
    answers_column: str = field(default="answers")
    weights_column: str | None = field(default="answer_weights")
    num_train_examples: int = field(default=3000, metadata={"help": "embedded dataset size"})
    num_eval_examples: int = field(default=300)
    describe_questions: bool = field(
        default=True, metadata={"help": "embedded dataset: also train on 'what is in the picture?' -> caption"}
    )
    describe_weight: float = field(
        default=0.25,
        metadata={"help": "loss weight of the describe rows (their NLL sums ~20 tokens against 1-2 of an answer)"},
    )
    questions_per_scene: int = field(
        default=1, metadata={"help": "embedded dataset: questions of different kinds asked about each training scene"}
    )
    max_eval_samples: int | None = field(default=None)
    max_question_length: int = field(default=25)
    demo_questions: int = field(default=5, metadata={"help": "held-out questions answered through the pipeline"})


def parse_args(argv: list[str]):
    parser, (model_args, data_args, training_args) = parse_with_defaults(
        (ModelArguments, DataArguments, TrainingArguments), DEMO_DEFAULTS, argv
    )
    if data_args.annotation_format not in ("columns", "alicemind"):
        parser.error("--annotation_format must be 'columns' or 'alicemind'")
    return model_args, data_args, training_args


# ------------------------------------------------------------------------------------------------ data
def _alicemind_rows(path: str) -> list[dict]:
    """The original VQA annotation format: [{"image": path, "question": ..., "answer": [...]}] (answers repeated as
    annotators gave them; optional `dataset`). Each distinct answer is a target weighted by its share of the list,
    Visual Genome / GQA answers by 0.5, as the original `vqa_dataset.py` computes them."""
    with open(path, encoding="utf-8") as handle:
        annotations = json.load(handle)
    rows = []
    for index, item in enumerate(annotations):
        for key in ("image", "question", "answer"):
            if key not in item:
                raise ValueError(f"{path}, entry {index}: missing `{key}`.")
        answers = item["answer"] if isinstance(item["answer"], list) else [item["answer"]]
        if not answers or not all(isinstance(a, str) and a.strip() for a in answers):
            raise ValueError(f"{path}, entry {index}: `answer` must hold non-empty strings.")
        counts = Counter(answers)
        distinct = list(counts)
        weights = [counts[a] / len(answers) for a in distinct]
        if item.get("dataset") in ("vg", "gqa"):  # the original gives Visual Genome / GQA answers weight 0.5
            distinct, weights = distinct[:1], [0.5]
        rows.append(
            {
                "image": item["image"],
                "question": item["question"],
                "answers": distinct,
                "answer_weights": weights,
                "vqa_answers": answers,
            }
        )
    return rows


def load_data(data_args: DataArguments, image_size: int):
    raw = load_task_data(
        data_args,
        (data_args.image_column, data_args.question_column, data_args.answers_column),
        lambda: load_shapes_dataset(
            data_args.num_train_examples,
            data_args.num_eval_examples,
            image_size=image_size,
            describe=data_args.describe_questions,
            describe_weight=data_args.describe_weight,
            questions_per_scene=data_args.questions_per_scene,
        ),
        (data_args.image_column,),
        _alicemind_rows,
        "alicemind",
    )
    if data_args.max_eval_samples:
        raw["validation"] = raw["validation"].select(range(min(data_args.max_eval_samples, len(raw["validation"]))))
    return raw


# ------------------------------------------------------------------------------------------------ model
def build_model_and_processor(model_args: ModelArguments, output_dir: Path):
    if model_args.model_name_or_path:
        model = MPLUGForQuestionAnswering.from_pretrained(model_args.model_name_or_path)
        processor = MPLUGProcessor.from_pretrained(model_args.model_name_or_path)
        return model, processor
    processor = demo_processor(output_dir, model_args.image_size, model_args.vocab_path)
    config = model_args.fresh_config(len(processor.tokenizer))
    return MPLUGForQuestionAnswering(config), processor


# ------------------------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def generate_answers(model, processor, dataset, data_args: DataArguments, batch_size: int) -> list[str]:
    """Answers decoded with the model's generation config (the script's evaluation decoding), in row order.

    Each image is encoded once for all its questions: rows are grouped by image (`image_keys`), a batch of
    `batch_size` questions encodes only the images it has not seen and generates from their embeddings. Under
    `accelerate launch --num_processes N` every rank answers its share of the images and the answers are gathered
    (every rank returns all of them). Under DeepSpeed ZeRO-3, whose forward passes all ranks take together, every rank
    answers every question instead."""
    model.eval()
    rank, world_size = evaluation_rank_and_world_size()
    keys = image_keys(dataset, data_args.image_column)
    groups = share_of_groups(group_rows_by_image(keys), rank, world_size)
    rows = [row for group in groups for row in group]
    questions = dataset[data_args.question_column]
    answered, cache = [], {}
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        batch_keys = [keys[row] for row in batch]
        new = [key for key in dict.fromkeys(batch_keys) if key not in cache]
        if new:
            first_row = {key: row for row, key in zip(reversed(batch), reversed(batch_keys))}
            images = [dataset[first_row[key]][data_args.image_column] for key in new]
            pixel_values = processor(images=images)["pixel_values"].to(model.device)
            cache.update(zip(new, model.mplug.encode_image(pixel_values)[1]))
        text = processor(text=[questions[row] for row in batch])
        output = model.generate(
            input_ids=text["input_ids"].to(model.device),
            attention_mask=text["attention_mask"].to(model.device),
            image_embeds=torch.stack([cache[key] for key in batch_keys]),
        )
        answered += zip(batch, processor.batch_decode(output))
        cache = {batch_keys[-1]: cache[batch_keys[-1]]}  # only the last image can have questions in the next batch
    by_row = dict(gather_objects_across_ranks(answered))
    return [by_row[row] for row in range(len(dataset))]


def compute_vqa_metrics(
    predictions: list[str], references: list[list[str]], questions: list[str] | None = None
) -> dict[str, float]:
    """`evaluate`-style metrics of generated answers against the human answers of each question; with `questions`,
    also the accuracy per question type (its first two words, e.g. `vqa_accuracy[how many]`)."""
    metrics = {"vqa_accuracy": vqa_accuracy(predictions, references)}
    if questions is not None:
        groups: dict[str, list[int]] = {}
        for index, question in enumerate(questions):
            groups.setdefault(" ".join(question.lower().split()[:2]), []).append(index)
        for kind, rows in sorted(groups.items()):
            metrics[f"vqa_accuracy[{kind}]"] = vqa_accuracy(
                [predictions[i] for i in rows], [references[i] for i in rows]
            )
    return metrics


def references_of(dataset, data_args: DataArguments) -> list[list[str]]:
    column = "vqa_answers" if "vqa_answers" in dataset.column_names else data_args.answers_column
    return [list(a) if isinstance(a, list) else [a] for a in dataset[column]]


class VQATrainer(Trainer):
    """A Trainer whose evaluation adds the VQA accuracy of generated answers to the loss."""

    def __init__(
        self,
        *args,
        vqa_processor=None,
        data_args=None,
        vision_learning_rate: float | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.vqa_processor, self.data_args = vqa_processor, data_args
        self.last_predictions: list[str] | None = None  # the generated answers of the latest evaluation
        self.vision_learning_rate = vision_learning_rate

    def create_optimizer(self, *args, **kwargs):
        if self.optimizer is not None or self.vision_learning_rate is None:
            return super().create_optimizer(*args, **kwargs)
        decay = set(self.get_decay_parameter_names(self.model))
        groups: dict[tuple[bool, bool], list] = {}
        for name, parameter in self.model.named_parameters():
            if parameter.requires_grad:
                groups.setdefault((".vision_model." in f".{name}", name in decay), []).append(parameter)
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
        param_groups = [
            {
                "params": params,
                "weight_decay": self.args.weight_decay if decayed else 0.0,
                "lr": self.vision_learning_rate if vision else self.args.learning_rate,
            }
            for (vision, decayed), params in groups.items()
        ]
        self.optimizer = optimizer_cls(param_groups, **optimizer_kwargs)
        return self.optimizer

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        predictions = generate_answers(
            self.model,
            self.vqa_processor,
            dataset,
            self.data_args,
            self.args.per_device_eval_batch_size,
        )
        self.last_predictions = predictions
        scores = compute_vqa_metrics(
            predictions, references_of(dataset, self.data_args), list(dataset[self.data_args.question_column])
        )
        scores = {f"{metric_key_prefix}_{k}": v for k, v in scores.items()}
        self.log(scores)
        metrics.update(scores)
        return metrics


def write_predictions(dataset, predictions: list[str], data_args: DataArguments, path: Path) -> None:
    """The evaluated questions with their generated answers and reference answers, in row order (JSON list)."""
    rows = [
        {"question": question, "prediction": prediction, "answers": answers}
        for question, prediction, answers in zip(
            dataset[data_args.question_column], predictions, references_of(dataset, data_args)
        )
    ]
    path.write_text(json.dumps(rows, indent=1), encoding="utf-8")


def prior_baseline(train, validation, data_args: DataArguments) -> float:
    """Accuracy of answering every question with the most common training answer of its question (the language
    prior a model gets without looking at the image)."""
    by_question = {}
    for question, answers in zip(train[data_args.question_column], train[data_args.answers_column]):
        key = question if question.startswith(("how many", "is there")) else " ".join(question.split()[:3])
        by_question.setdefault(key, Counter())[answers[0] if isinstance(answers, list) else answers] += 1
    overall = Counter(a for c in by_question.values() for a in c.elements()).most_common(1)[0][0]
    guesses = []
    for question in validation[data_args.question_column]:
        key = question if question.startswith(("how many", "is there")) else " ".join(question.split()[:3])
        guesses.append(by_question[key].most_common(1)[0][0] if key in by_question else overall)
    return vqa_accuracy(guesses, references_of(validation, data_args))


def plot(log_history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [e["step"] for e in log_history if "loss" in e]
    losses = [e["loss"] for e in log_history if "loss" in e]
    eval_steps = [e["step"] for e in log_history if "eval_vqa_accuracy" in e]
    accuracy = [e["eval_vqa_accuracy"] for e in log_history if "eval_vqa_accuracy" in e]
    figure, left = plt.subplots(figsize=(7, 4))
    left.plot(steps, losses, color="tab:blue", label="training loss")
    left.set_xlabel("step")
    left.set_ylabel("loss", color="tab:blue")
    right = left.twinx()
    right.plot(eval_steps, accuracy, "o-", color="tab:orange", label="held-out VQA accuracy")
    right.set_ylabel("VQA accuracy", color="tab:orange")
    right.set_ylim(0, 1)
    figure.suptitle("mPLUG VQA fine-tuning")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, training_args = parse_args(sys.argv[1:] if argv is None else argv)
    start_run(training_args)
    output_dir = Path(training_args.output_dir)
    model, processor = build_model_and_processor(model_args, output_dir)
    model.generation_config = evaluation_decoding(
        model, model_args.eval_decoding_mode, model_args.eval_num_beams, model_args.eval_max_new_tokens
    )
    raw = load_data(data_args, processor.image_processor.size["height"])
    logger.info(
        "train %d examples, validation %d; %.1fM parameters",
        len(raw["train"]),
        len(raw["validation"]),
        sum(p.numel() for p in model.parameters()) / 1e6,
    )
    collator = MPLUGVQACollator(
        processor,
        data_args.image_column,
        data_args.question_column,
        data_args.answers_column,
        data_args.weights_column or "answer_weights",
        data_args.max_question_length,
    )
    trainer = VQATrainer(
        model=model,
        args=training_args,
        train_dataset=raw["train"],
        eval_dataset=raw["validation"],
        data_collator=collator,
        vqa_processor=processor,
        data_args=data_args,
        vision_learning_rate=model_args.vision_learning_rate,
    )
    started = time.time()
    if not model_args.eval_only:
        trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    train_seconds = time.time() - started
    metrics = trainer.evaluate()
    metrics["prior_baseline_vqa_accuracy"] = prior_baseline(raw["train"], raw["validation"], data_args)
    metrics["train_seconds"] = train_seconds
    metrics["deepspeed_zero_stage"] = (
        trainer.accelerator.state.deepspeed_plugin.zero_stage if trainer.is_deepspeed_enabled else None
    )
    metrics["world_size"] = training_args.world_size
    trainer.save_model(training_args.output_dir)  # on every rank: ZeRO-3 gathers the partitioned weights
    if trainer.is_world_process_zero():
        processor.save_pretrained(training_args.output_dir)
        model.generation_config.save_pretrained(training_args.output_dir)
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
        write_predictions(raw["validation"], trainer.last_predictions, data_args, output_dir / "eval_predictions.json")
        plot(trainer.state.log_history, output_dir / "training_curves.png")
        logger.info(
            "VQA accuracy %.3f (question-prior baseline %.3f) after %.0f s of training",
            metrics["eval_vqa_accuracy"],
            metrics["prior_baseline_vqa_accuracy"],
            train_seconds,
        )
        if data_args.demo_questions:
            # the saved folder is a plain checkpoint: load it outside the training's ZeRO-3 partitioning context
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config

            unset_hf_deepspeed_config()
            vqa = pipeline("visual-question-answering", model=str(output_dir))
            for row in raw["validation"].select(range(min(data_args.demo_questions, len(raw["validation"])))):
                answer = vqa(row[data_args.image_column], row[data_args.question_column])[0]
                truth = row[data_args.answers_column][0]
                print(
                    f"Q: {row[data_args.question_column]:<40} A: {answer['answer']:<14} "
                    f"(p={answer['score']:.2f}; expected {truth})"
                )
    finish_distributed()
    return metrics


if __name__ == "__main__":
    main()
