#!/usr/bin/env python
"""Fine-tune mPLUG for image-text entailment (SNLI-VE) with the transformers Trainer: an MLP on the fused `[CLS]`
classifies a hypothesis as entailed by the image, neutral, or contradicted; evaluation by accuracy.

With no arguments it trains a small model from scratch on embedded "shapes" scenes with existence, count and
"there is an X behind the Y" hypotheses (offline, CPU), reports held-out accuracy beside the majority-class baseline,
saves the model and processor, and writes metrics JSON and a plot.

    accelerate launch examples/run_ve.py
    accelerate launch examples/run_ve.py --model_name_or_path mplug-base-pretrained --annotation_format snli_ve \\
        --train_file snli_ve_train.jsonl --validation_file snli_ve_dev.jsonl --image_root flickr30k-images/ --bf16

Data: the embedded scenes, `--dataset_name`, JSON/CSV files (`--image_column --hypothesis_column --label_column`,
labels as ids or names), or the original SNLI-VE jsonl (`--annotation_format snli_ve`: `Flickr30K_ID`,
`sentence2`, `gold_label`; images `<image_root>/<Flickr30K_ID>.jpg`).
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

from transformers_mplug import MPLUGForVisualEntailment, MPLUGProcessor
from transformers_mplug.data import (
    ENTAILMENT_LABELS,
    MPLUGImageTextClassificationCollator,
    load_shapes_entailment_dataset,
)

logger = logging.getLogger("run_ve")

DEMO_DEFAULTS = demo_defaults("run_ve", epochs=8, learning_rate="3e-4")


@dataclass
class DataArguments(DemoDataArguments):
    annotation_format: str = field(default="columns", metadata={"help": "'columns' or 'snli_ve'"})
    image_column: str = field(default="image")
    hypothesis_column: str = field(default="hypothesis")
    label_column: str = field(default="label")
    max_length: int = field(default=40)
    num_eval_examples: int = field(default=300)


def _snli_ve_rows(path: str) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as handle:
        for index, line in enumerate(handle):
            if not line.strip():
                continue
            item = json.loads(line)
            for key in ("Flickr30K_ID", "sentence2", "gold_label"):
                if key not in item:
                    raise ValueError(f"{path}, line {index + 1}: missing `{key}`.")
            if item["gold_label"] not in ENTAILMENT_LABELS:
                raise ValueError(
                    f"{path}, line {index + 1}: `gold_label` {item['gold_label']!r} not in {ENTAILMENT_LABELS}."
                )
            rows.append(
                {
                    "image": f"{item['Flickr30K_ID']}.jpg",
                    "hypothesis": item["sentence2"],
                    "label": ENTAILMENT_LABELS.index(item["gold_label"]),
                }
            )
    return rows


def load_data(data_args: DataArguments, image_size: int):
    return load_task_data(
        data_args,
        (data_args.image_column, data_args.hypothesis_column, data_args.label_column),
        lambda: load_shapes_entailment_dataset(
            data_args.num_train_examples, data_args.num_eval_examples, image_size=image_size
        ),
        (data_args.image_column,),
        _snli_ve_rows,
        "snli_ve",
    )


def main(argv: list[str] | None = None) -> dict:
    parser, (model_args, data_args, training_args) = parse_with_defaults(
        (DemoModelArguments, DataArguments, TrainingArguments), DEMO_DEFAULTS, sys.argv[1:] if argv is None else argv
    )
    if data_args.annotation_format not in ("columns", "snli_ve"):
        parser.error("--annotation_format must be 'columns' or 'snli_ve'")
    start_run(training_args)
    output_dir = Path(training_args.output_dir)
    id2label = dict(enumerate(ENTAILMENT_LABELS))
    if model_args.model_name_or_path:
        model = MPLUGForVisualEntailment.from_pretrained(
            model_args.model_name_or_path, id2label=id2label, label2id={v: k for k, v in id2label.items()}
        )
        processor = MPLUGProcessor.from_pretrained(model_args.model_name_or_path)
    else:
        processor = demo_processor(output_dir, model_args.image_size, model_args.vocab_path)
        config = model_args.fresh_config(
            len(processor.tokenizer), id2label=id2label, label2id={v: k for k, v in id2label.items()}
        )
        model = MPLUGForVisualEntailment(config)
    raw = load_data(data_args, processor.image_processor.size["height"])
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=raw["train"],
        eval_dataset=raw["validation"],
        data_collator=MPLUGImageTextClassificationCollator(
            processor,
            model.config.label2id,
            data_args.image_column,
            data_args.hypothesis_column,
            data_args.label_column,
            max_length=data_args.max_length,
        ),
        compute_metrics=accuracy_metrics,
    )
    started = time.time()
    ignore = ["fused_text_embeds"]  # only the logits are gathered for the metrics
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint, ignore_keys_for_eval=ignore)
    train_seconds = time.time() - started
    metrics = trainer.evaluate(ignore_keys=ignore)
    train_labels = Counter(int(x) if not isinstance(x, str) else x for x in raw["train"][data_args.label_column])
    majority = train_labels.most_common(1)[0][0]
    eval_labels = list(raw["validation"][data_args.label_column])
    metrics["majority_class_accuracy"] = sum(label == majority for label in eval_labels) / len(eval_labels)
    metrics.update(train_seconds=train_seconds, world_size=training_args.world_size)
    trainer.save_model(training_args.output_dir)
    if trainer.is_world_process_zero():
        processor.save_pretrained(training_args.output_dir)
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
        plot_curves(
            trainer.state.log_history, "accuracy", "mPLUG visual entailment", output_dir / "training_curves.png"
        )
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
