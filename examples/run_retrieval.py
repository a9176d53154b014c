#!/usr/bin/env python
"""Fine-tune mPLUG for image-text retrieval with the transformers Trainer: ITC (in-batch contrastive loss) + ITM with
hard negatives drawn from the ITC similarities, as the original fine-tuning; evaluation by Recall@1/5/10 in both
directions through the corpus retrieval API (`MPLUGForRetrieval.retrieve`: ITC top-k re-ranked by ITM).

With no arguments it trains a small model from scratch on the embedded "shapes" scenes and their descriptions
(offline, CPU), reports Recall@K on held-out pairs (chance level beside it), saves the model and processor, and writes
metrics JSON and a plot.

    accelerate launch examples/run_retrieval.py
    accelerate launch examples/run_retrieval.py --model_name_or_path mplug-large-retrieval \\
        --train_file pairs.json --validation_file val.json --image_root images/ --bf16
    accelerate launch --config_file examples/configs/accelerate_cpu_multiprocess.yaml --num_processes 2 \\
        examples/run_retrieval.py --model_name_or_path OUT --eval_only      # evaluation split across 2 processes

The evaluation gallery holds each image once with all its texts; with several processes each rank encodes and
re-ranks its share (`MPLUGForRetrieval.retrieve(distributed=True)`) and the results are gathered.

Data: the embedded scenes, `--dataset_name`, or `--train_file/--validation_file` (JSON/CSV with `--image_column`,
`--text_column` and optionally `--image_id_column` (texts of one image are positives of each other), image paths under
`--image_root`), or `--annotation_format alicemind` (`[{"image": path, "caption": str or [str, ...]}]`).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from mplug_examples import (
    DemoDataArguments,
    DemoModelArguments,
    LossComponentsTrainer,
    demo_defaults,
    demo_processor,
    finish_distributed,
    load_task_data,
    parse_with_defaults,
    plot_curves,
    read_caption_annotations,
    retrieval_evaluation,
    start_run,
)
from transformers import TrainingArguments

from transformers_mplug import MPLUGForRetrieval, MPLUGProcessor
from transformers_mplug.data import MPLUGRetrievalCollator, load_shapes_dataset

logger = logging.getLogger("run_retrieval")

DEMO_DEFAULTS = demo_defaults("run_retrieval", epochs=6, learning_rate="3e-4")


@dataclass
class ModelArguments(DemoModelArguments):
    projection_dim: int = field(default=64)
    k_test: int = field(default=16, metadata={"help": "ITC candidates re-ranked by ITM (the original's k_test)"})
    eval_only: bool = field(default=False, metadata={"help": "evaluate --model_name_or_path without training"})


@dataclass
class DataArguments(DemoDataArguments):
    annotation_format: str = field(default="columns", metadata={"help": "'columns' or 'alicemind'"})
    image_column: str = field(default="image")
    text_column: str = field(default="description")
    image_id_column: str | None = field(default=None, metadata={"help": "rows with equal ids share an image"})
    max_length: int = field(default=30)


def _alicemind_rows(path: str) -> list[dict]:
    """The original retrieval annotations: one row per caption, captions of one image share its `image_id`."""
    return [
        {"image": image, "caption": caption, "image_id": index}
        for index, (image, captions) in enumerate(read_caption_annotations(path))
        for caption in captions
    ]


def load_data(data_args: DataArguments, image_size: int):
    return load_task_data(
        data_args,
        (data_args.image_column, data_args.text_column, data_args.image_id_column),
        lambda: load_shapes_dataset(data_args.num_train_examples, data_args.num_eval_examples, image_size=image_size),
        (data_args.image_column,),
        _alicemind_rows,
        "alicemind",
    )


class RetrievalTrainer(LossComponentsTrainer):
    """Logs `loss_itc` / `loss_itm` and, at evaluation, Recall@K through `retrieve`."""

    loss_components = ("loss_itc", "loss_itm")

    def __init__(self, *args, processor=None, data_args=None, k_test: int = 16, **kwargs):
        super().__init__(*args, **kwargs)
        self.retrieval_processor, self.data_args, self.k_test = processor, data_args, k_test

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        model = self.accelerator.unwrap_model(self.model)
        recall = retrieval_evaluation(
            model,
            self.retrieval_processor,
            dataset,
            self.data_args.image_column,
            self.data_args.text_column,
            self.k_test,
            image_id_column=self.data_args.image_id_column,
        )
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in recall.items()}
        self.log(metrics)
        return metrics


def main(argv: list[str] | None = None) -> dict:
    parser, (model_args, data_args, training_args) = parse_with_defaults(
        (ModelArguments, DataArguments, TrainingArguments), DEMO_DEFAULTS, sys.argv[1:] if argv is None else argv
    )
    if data_args.annotation_format not in ("columns", "alicemind"):
        parser.error("--annotation_format must be 'columns' or 'alicemind'")
    if data_args.annotation_format == "alicemind":
        data_args.text_column, data_args.image_id_column = "caption", "image_id"
    if model_args.eval_only and not model_args.model_name_or_path:
        parser.error("--eval_only evaluates a saved folder: pass --model_name_or_path")
    start_run(training_args)
    output_dir = Path(training_args.output_dir)
    if model_args.model_name_or_path:
        model = MPLUGForRetrieval.from_pretrained(model_args.model_name_or_path)
        processor = MPLUGProcessor.from_pretrained(model_args.model_name_or_path)
    else:
        processor = demo_processor(output_dir, model_args.image_size, model_args.vocab_path)
        config = model_args.fresh_config(len(processor.tokenizer), projection_dim=model_args.projection_dim)
        model = MPLUGForRetrieval(config)
    raw = load_data(data_args, processor.image_processor.size["height"])
    trainer = RetrievalTrainer(
        model=model,
        args=training_args,
        train_dataset=raw["train"],
        eval_dataset=raw["validation"],
        data_collator=MPLUGRetrievalCollator(
            processor, data_args.image_column, data_args.text_column, data_args.image_id_column, data_args.max_length
        ),
        processor=processor,
        data_args=data_args,
        k_test=model_args.k_test,
    )
    started = time.time()
    if not model_args.eval_only:
        trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    train_seconds = time.time() - started
    started = time.perf_counter()
    metrics = trainer.evaluate()
    eval_seconds = time.perf_counter() - started
    gallery = metrics["eval_gallery_size"]
    metrics.update(
        train_seconds=train_seconds,
        eval_seconds=eval_seconds,
        world_size=training_args.world_size,
        chance_r1=100.0 / gallery,
        chance_r10=100.0 * min(10, gallery) / gallery,
    )
    metrics["deepspeed_zero_stage"] = (
        trainer.accelerator.state.deepspeed_plugin.zero_stage if trainer.is_deepspeed_enabled else None
    )
    trainer.save_model(training_args.output_dir)
    if trainer.is_world_process_zero():
        processor.save_pretrained(training_args.output_dir)
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
        plot_curves(
            trainer.state.log_history, "r_mean", "mPLUG retrieval", output_dir / "training_curves.png", (0, 100)
        )
        logger.info(
            "held-out text R@1 %.1f, image R@1 %.1f (ITC alone: %.1f, %.1f; chance %.1f) over %d pairs after %.0f s",
            metrics["eval_txt_r1"],
            metrics["eval_img_r1"],
            metrics["eval_itc_txt_r1"],
            metrics["eval_itc_img_r1"],
            metrics["chance_r1"],
            gallery,
            train_seconds,
        )
    finish_distributed()
    return metrics


if __name__ == "__main__":
    main()
