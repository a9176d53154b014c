#!/usr/bin/env python
"""Fine-tune mPLUG for visual grounding (referring expressions) with the transformers Trainer: the decoder writes a
box as 4 coordinate tokens, trained with the original loss (token cross-entropy weighted by L1 and 1 - GIoU);
evaluation by Acc@0.5 (IoU >= 0.5 of the predicted box, in pixels of the original image).

With no arguments it trains a small model from scratch on the embedded "shapes" scenes ("the red circle" -> its box;
offline, CPU), reports Acc@0.5 on held-out phrases beside the accuracy of always answering the mean training box,
saves the model and processor, and writes metrics JSON and a plot.

    accelerate launch examples/run_grounding.py
    accelerate launch examples/run_grounding.py --model_name_or_path mplug-large-refcoco \\
        --train_file refs.json --image_root images/ --bf16

Data: the embedded scenes, `--dataset_name`, or `--train_file/--validation_file` (JSON/CSV with `--image_column`,
`--phrase_column` and `--box_column` holding pixel `[x1, y1, x2, y2]`, image paths under `--image_root`).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from mplug_examples import (
    DemoDataArguments,
    DemoModelArguments,
    demo_defaults,
    demo_processor,
    finish_distributed,
    load_task_data,
    parse_with_defaults,
    plot_curves,
    start_run,
)
from transformers import Trainer, TrainingArguments

from transformers_mplug import MPLUGForGrounding, MPLUGProcessor
from transformers_mplug.data import MPLUGGroundingCollator, load_shapes_dataset
from transformers_mplug.metrics import grounding_accuracy

logger = logging.getLogger("run_grounding")

DEMO_DEFAULTS = demo_defaults("run_grounding", epochs=8, learning_rate="5e-4")
# the demo vocabulary has 99 [unused] tokens: [unused0] is the box prefix, [unused1..64] are 64 coordinate bins
DEMO_GROUNDING_TOKENS = {"prefix": "[unused0]", "start": "[unused1]", "bins": 64}


@dataclass
class ModelArguments(DemoModelArguments):
    pass


@dataclass
class DataArguments(DemoDataArguments):
    image_column: str = field(default="image")
    phrase_column: str = field(default="phrase")
    box_column: str = field(default="box")
    max_length: int = field(default=25)


def load_data(data_args: DataArguments, image_size: int):
    return load_task_data(
        data_args,
        (data_args.image_column, data_args.phrase_column, data_args.box_column),
        lambda: load_shapes_dataset(data_args.num_train_examples, data_args.num_eval_examples, image_size=image_size),
        (data_args.image_column,),
    )


@torch.no_grad()
def predict(model, processor, dataset, data_args: DataArguments, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted and target boxes, pixel `(x1, y1, x2, y2)` in the original images."""
    model.eval()
    predicted, targets = [], []
    for start in range(0, len(dataset), batch_size):
        rows = dataset[start : start + batch_size]
        batch = processor.prepare_grounding(
            list(rows[data_args.image_column]), list(rows[data_args.phrase_column]), max_length=data_args.max_length
        )
        output = model.predict_boxes(
            batch["pixel_values"].to(model.device),
            batch["input_ids"].to(model.device),
            batch["attention_mask"].to(model.device),
        )
        predicted.append(processor.box_normalized_to_pixels(output.pred_boxes.cpu(), batch["image_geometry"]))
        targets.append(torch.as_tensor(rows[data_args.box_column], dtype=torch.float32))
    return torch.cat(predicted), torch.cat(targets)


class GroundingTrainer(Trainer):
    """Evaluation reports Acc@0.5 of the predicted boxes."""

    def __init__(self, *args, processor=None, data_args=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.grounding_processor, self.data_args = processor, data_args

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        model = self.accelerator.unwrap_model(self.model)
        predicted, targets = predict(
            model, self.grounding_processor, dataset, self.data_args, self.args.per_device_eval_batch_size
        )
        score = {f"{metric_key_prefix}_acc_at_0.5": grounding_accuracy(predicted, targets)}
        self.log(score)
        metrics.update(score)
        return metrics


def build_model(model_args: ModelArguments, output_dir: Path) -> tuple[MPLUGForGrounding, MPLUGProcessor]:
    if model_args.model_name_or_path:
        model = MPLUGForGrounding.from_pretrained(model_args.model_name_or_path)
        return model, MPLUGProcessor.from_pretrained(model_args.model_name_or_path)
    base = demo_processor(output_dir, model_args.image_size, model_args.vocab_path)
    processor = MPLUGProcessor(
        base.image_processor,
        base.tokenizer,
        coordinate_start_token=DEMO_GROUNDING_TOKENS["start"],
        num_coordinate_bins=DEMO_GROUNDING_TOKENS["bins"],
    )
    config = model_args.fresh_config(
        len(processor.tokenizer),
        grounding_prefix_token_id=processor.tokenizer.convert_tokens_to_ids(DEMO_GROUNDING_TOKENS["prefix"]),
        coordinate_token_start_id=processor.coordinate_token_start_id,
        num_coordinate_bins=DEMO_GROUNDING_TOKENS["bins"],
    )
    return MPLUGForGrounding(config), processor


def main(argv: list[str] | None = None) -> dict:
    _, (model_args, data_args, training_args) = parse_with_defaults(
        (ModelArguments, DataArguments, TrainingArguments), DEMO_DEFAULTS, sys.argv[1:] if argv is None else argv
    )
    start_run(training_args)
    output_dir = Path(training_args.output_dir)
    model, processor = build_model(model_args, output_dir)
    raw = load_data(data_args, processor.image_processor.size["height"])
    trainer = GroundingTrainer(
        model=model,
        args=training_args,
        train_dataset=raw["train"],
        eval_dataset=raw["validation"],
        data_collator=MPLUGGroundingCollator(
            processor, data_args.image_column, data_args.phrase_column, data_args.box_column, data_args.max_length
        ),
        processor=processor,
        data_args=data_args,
    )
    started = time.time()
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    train_seconds = time.time() - started
    metrics = trainer.evaluate()
    mean_box = torch.as_tensor(raw["train"][data_args.box_column], dtype=torch.float32).mean(0)
    targets = torch.as_tensor(raw["validation"][data_args.box_column], dtype=torch.float32)
    metrics["mean_box_acc_at_0.5"] = grounding_accuracy(mean_box.expand_as(targets), targets)
    metrics.update(train_seconds=train_seconds, world_size=training_args.world_size)
    metrics["deepspeed_zero_stage"] = (
        trainer.accelerator.state.deepspeed_plugin.zero_stage if trainer.is_deepspeed_enabled else None
    )
    trainer.save_model(training_args.output_dir)
    if trainer.is_world_process_zero():
        processor.save_pretrained(training_args.output_dir)
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
        plot_curves(trainer.state.log_history, "acc_at_0.5", "mPLUG grounding", output_dir / "training_curves.png")
        logger.info(
            "held-out Acc@0.5 %.3f (mean-box baseline %.3f) after %.0f s",
            metrics["eval_acc_at_0.5"],
            metrics["mean_box_acc_at_0.5"],
            train_seconds,
        )
    finish_distributed()
    return metrics


if __name__ == "__main__":
    main()
