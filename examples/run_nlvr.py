#!/usr/bin/env python
"""Fine-tune mPLUG for visual reasoning over image pairs (NLVR2) with the transformers Trainer: each fusion layer's
text attends to both images with its own cross-attention, an MLP on the fused `[CLS]` says true/false; evaluation by
accuracy.

With no arguments it trains a small model from scratch on embedded pairs of "shapes" scenes ("the left image has more
circles than the right image", "both images have a red square", ...; offline, CPU), reports held-out accuracy beside
the majority-class baseline, saves the model and processor, and writes metrics JSON and a plot.

    accelerate launch examples/run_nlvr.py
    accelerate launch examples/run_nlvr.py --model_name_or_path mplug-base-pretrained --annotation_format nlvr2 \\
        --train_file nlvr2_train.json --validation_file nlvr2_dev.json --image_root nlvr2/images/ --bf16

Starting from a single-image folder initialises both cross-attentions from its one cross-attention. Data: the embedded
pairs, JSON/CSV files (`--left_column --right_column --sentence_column --label_column`, image paths under
`--image_root`), or the NLVR2 json lines (`--annotation_format nlvr2`: `left`, `right` (paths), `sentence`, `label`
"True"/"False").
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from mplug_examples import (
    DemoDataArguments,
    DemoModelArguments,
    accuracy_metrics,
    demo_defaults,
    demo_processor,
    finish_distributed,
    load_task_data,
    parse_with_defaults,
    plot_curves,
    start_run,
)
from transformers import Trainer, TrainingArguments

from transformers_mplug import MPLUGForVisualReasoning, MPLUGProcessor
from transformers_mplug.data import MPLUGImageTextClassificationCollator, shapes_pair_examples

logger = logging.getLogger("run_nlvr")

DEMO_DEFAULTS = demo_defaults("run_nlvr", epochs=8, learning_rate="3e-4")
LABELS = {0: "false", 1: "true"}


@dataclass
class DataArguments(DemoDataArguments):
    annotation_format: str = field(default="columns", metadata={"help": "'columns' or 'nlvr2'"})
    left_column: str = field(default="left")
    right_column: str = field(default="right")
    sentence_column: str = field(default="sentence")
    label_column: str = field(default="label")
    max_length: int = field(default=40)
    num_eval_examples: int = field(default=300)


def _nlvr2_rows(path: str) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    items = (
        json.loads(text) if text.lstrip().startswith("[") else [json.loads(x) for x in text.splitlines() if x.strip()]
    )
    for index, item in enumerate(items):
        for key in ("left", "right", "sentence", "label"):
            if key not in item:
                raise ValueError(f"{path}, entry {index}: missing `{key}`.")
        label = str(item["label"]).lower()
        if label not in ("true", "false", "1", "0"):
            raise ValueError(f"{path}, entry {index}: `label` must be True/False, got {item['label']!r}.")
        rows.append(
            {
                "left": item["left"],
                "right": item["right"],
                "sentence": item["sentence"],
                "label": int(label in ("true", "1")),
            }
        )
    return rows


def load_data(data_args: DataArguments, image_size: int):
    import datasets

    def embedded():
        return datasets.DatasetDict(
            {
                "train": datasets.Dataset.from_list(shapes_pair_examples(data_args.num_train_examples, 0, image_size)),
                "validation": datasets.Dataset.from_list(
                    shapes_pair_examples(data_args.num_eval_examples, 1, image_size)
                ),
            }
        )

    return load_task_data(
        data_args,
        (data_args.left_column, data_args.right_column, data_args.sentence_column, data_args.label_column),
        embedded,
        (data_args.left_column, data_args.right_column),
        _nlvr2_rows,
        "nlvr2",
    )


def main(argv: list[str] | None = None) -> dict:
    parser, (model_args, data_args, training_args) = parse_with_defaults(
        (DemoModelArguments, DataArguments, TrainingArguments), DEMO_DEFAULTS, sys.argv[1:] if argv is None else argv
    )
    if data_args.annotation_format not in ("columns", "nlvr2"):
        parser.error("--annotation_format must be 'columns' or 'nlvr2'")
    start_run(training_args)
    output_dir = Path(training_args.output_dir)
    label2id = {v: k for k, v in LABELS.items()}
    if model_args.model_name_or_path:
        model = MPLUGForVisualReasoning.from_pretrained(
            model_args.model_name_or_path, id2label=LABELS, label2id=label2id
        )
        processor = MPLUGProcessor.from_pretrained(model_args.model_name_or_path)
    else:
        processor = demo_processor(output_dir, model_args.image_size, model_args.vocab_path)
        config = model_args.fresh_config(len(processor.tokenizer), id2label=LABELS, label2id=label2id)
        model = MPLUGForVisualReasoning(config)
    raw = load_data(data_args, processor.image_processor.size["height"])
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=raw["train"],
        eval_dataset=raw["validation"],
        data_collator=MPLUGImageTextClassificationCollator(
            processor,
            label2id,
            text_column=data_args.sentence_column,
            label_column=data_args.label_column,
            pair_columns=(data_args.left_column, data_args.right_column),
            max_length=data_args.max_length,
        ),
        compute_metrics=accuracy_metrics,
    )
    ignore = ["fused_text_embeds"]
    started = time.time()
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint, ignore_keys_for_eval=ignore)
    train_seconds = time.time() - started
    metrics = trainer.evaluate(ignore_keys=ignore)
    majority = Counter(int(x) for x in raw["train"][data_args.label_column]).most_common(1)[0][0]
    eval_labels = [int(x) for x in raw["validation"][data_args.label_column]]
    metrics["majority_class_accuracy"] = sum(label == majority for label in eval_labels) / len(eval_labels)
    metrics.update(train_seconds=train_seconds, world_size=training_args.world_size)
    trainer.save_model(training_args.output_dir)
    if trainer.is_world_process_zero():
        processor.save_pretrained(training_args.output_dir)
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
        plot_curves(trainer.state.log_history, "accuracy", "mPLUG NLVR", output_dir / "training_curves.png")
        logger.info(
            "held-out accuracy %.3f (majority class %.3f) after %.0f s",
            metrics["eval_accuracy"],
            metrics["majority_class_accuracy"],
            train_seconds,
        )
    finish_distributed()
    return metrics


if __name__ == "__main__":
    main()
