#!/usr/bin/env python
"""Pretrain mPLUG with the transformers Trainer: ITC (momentum teacher + queue), ITM with hard negatives, MLM on the
fused text and PrefixLM through the decoder.

With no arguments it pretrains a small mPLUG from scratch on the embedded "shapes" image-text pairs (offline, CPU),
reports image-text retrieval Recall@K on held-out pairs, and saves a folder that every task head loads.

    accelerate launch examples/run_pretraining.py
    accelerate launch examples/run_pretraining.py --init_vision_model openai/clip-vit-base-patch16 \\
        --init_text_model bert-base-uncased --train_file pairs.json --image_root images/ --bf16
    accelerate launch --config_file examples/configs/accelerate_cpu_deepspeed.yaml examples/run_pretraining.py \\
        --deepspeed examples/configs/ds_zero3.json

Data: the embedded pairs, `--dataset_name`, or `--train_file/--validation_file` (JSON/CSV with `--image_column` and
`--caption_column`, image paths under `--image_root`).
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
    retrieval_evaluation,
    start_run,
)
from transformers import TrainingArguments

from transformers_mplug import MPLUGForPreTraining, MPLUGMomentumCallback, MPLUGProcessor
from transformers_mplug.data import MPLUGPretrainingCollator, load_shapes_dataset

logger = logging.getLogger("run_pretraining")

DEMO_DEFAULTS = demo_defaults("run_pretraining", epochs=5, learning_rate="3e-4", eval_strategy="no")


@dataclass
class ModelArguments(DemoModelArguments):
    init_vision_model: str | None = field(default=None, metadata={"help": "CLIP vision checkpoint to start from"})
    init_text_model: str | None = field(default=None, metadata={"help": "BERT checkpoint to start from"})
    projection_dim: int = field(default=64)
    queue_size: int = field(default=1024, metadata={"help": "ITC queue length (0 disables it)"})
    momentum: float = field(default=0.995, metadata={"help": "EMA coefficient of the momentum teacher"})
    distillation_alpha: float = field(default=0.4)
    itc_weight: float = field(default=1.0)
    itm_weight: float = field(default=1.0)
    mlm_weight: float = field(default=1.0)
    prefix_lm_weight: float = field(default=1.0)


@dataclass
class DataArguments(DemoDataArguments):
    image_column: str = field(default="image")
    caption_column: str = field(default="description")
    mlm_probability: float = field(default=0.15)
    max_length: int = field(default=30)
    retrieval_k: int = field(default=16, metadata={"help": "ITC candidates re-ranked by ITM in the evaluation"})


def build_model(model_args: ModelArguments, output_dir: Path) -> tuple[MPLUGForPreTraining, MPLUGProcessor]:
    overrides = dict(
        projection_dim=model_args.projection_dim,
        queue_size=model_args.queue_size,
        momentum=model_args.momentum,
        distillation_alpha=model_args.distillation_alpha,
        pretraining_loss_weights={
            "itc": model_args.itc_weight,
            "itm": model_args.itm_weight,
            "mlm": model_args.mlm_weight,
            "prefix_lm": model_args.prefix_lm_weight,
        },
    )
    if model_args.model_name_or_path:
        model = MPLUGForPreTraining.from_pretrained(model_args.model_name_or_path, **overrides)
        return model, MPLUGProcessor.from_pretrained(model_args.model_name_or_path)
    if bool(model_args.init_vision_model) != bool(model_args.init_text_model):
        raise ValueError("Pass both --init_vision_model and --init_text_model (or neither, for a fresh model).")
    if model_args.init_vision_model:
        model = MPLUGForPreTraining.from_unimodal_pretrained(
            model_args.init_vision_model,
            model_args.init_text_model,
            num_text_layers=model_args.text_layers,
            num_cross_modal_layers=model_args.cross_modal_layers,
            num_decoder_layers=model_args.decoder_layers,
            image_size=model_args.image_size,
            **overrides,
        )
        vocab = model_args.vocab_path or str(Path(model_args.init_text_model) / "vocab.txt")
        return model, MPLUGProcessor.from_vocab_file(vocab, image_size=model_args.image_size)
    processor = demo_processor(output_dir, model_args.image_size, model_args.vocab_path)
    config = model_args.fresh_config(len(processor.tokenizer), **overrides)
    return MPLUGForPreTraining(config), processor


def load_data(data_args: DataArguments, image_size: int):
    return load_task_data(
        data_args,
        (data_args.image_column, data_args.caption_column),
        lambda: load_shapes_dataset(data_args.num_train_examples, data_args.num_eval_examples, image_size=image_size),
        (data_args.image_column,),
    )


class PretrainingTrainer(LossComponentsTrainer):
    """Logs each objective beside the total loss."""

    loss_components = ("loss_itc", "loss_itm", "loss_mlm", "loss_prefix_lm")


def main(argv: list[str] | None = None) -> dict:
    _, (model_args, data_args, training_args) = parse_with_defaults(
        (ModelArguments, DataArguments, TrainingArguments), DEMO_DEFAULTS, sys.argv[1:] if argv is None else argv
    )
    start_run(training_args)
    output_dir = Path(training_args.output_dir)
    model, processor = build_model(model_args, output_dir)
    raw = load_data(data_args, processor.image_processor.size["height"])
    # each training row is its own image: rows of one image would share an `idx` column
    train = raw["train"].add_column("idx", list(range(len(raw["train"]))))
    collator = MPLUGPretrainingCollator(
        processor,
        data_args.image_column,
        data_args.caption_column,
        idx_column="idx",
        mlm_probability=data_args.mlm_probability,
        max_length=data_args.max_length,
    )
    callback = MPLUGMomentumCallback()
    trainer = PretrainingTrainer(
        model=model, args=training_args, train_dataset=train, data_collator=collator, callbacks=[callback]
    )
    started = time.time()
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    train_seconds = time.time() - started
    metrics = {
        "train_seconds": train_seconds,
        "momentum_updates": callback.updates,
        "world_size": training_args.world_size,
    }
    metrics["deepspeed_zero_stage"] = (
        trainer.accelerator.state.deepspeed_plugin.zero_stage if trainer.is_deepspeed_enabled else None
    )
    losses = [e for e in trainer.state.log_history if "loss" in e]
    if losses:
        for name in ("loss", "loss_itc", "loss_itm", "loss_mlm", "loss_prefix_lm"):
            if name in losses[-1]:
                metrics[f"first_logged_{name}"], metrics[f"last_logged_{name}"] = losses[0][name], losses[-1][name]
    trainer.save_model(training_args.output_dir)  # on every rank: ZeRO-3 gathers the partitioned weights
    if trainer.is_world_process_zero():
        unwrapped = trainer.accelerator.unwrap_model(trainer.model)
        if not trainer.is_deepspeed_enabled or metrics["deepspeed_zero_stage"] != 3:
            recall = retrieval_evaluation(
                unwrapped,
                processor,
                raw["validation"],
                data_args.image_column,
                data_args.caption_column,
                data_args.retrieval_k,
            )
            metrics.update({f"eval_{k}": v for k, v in recall.items()})
            logger.info("held-out retrieval: %s", {k: round(v, 1) for k, v in recall.items()})
        processor.save_pretrained(training_args.output_dir)
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
        plot_curves(trainer.state.log_history, "loss", "mPLUG pretraining", output_dir / "training_curves.png", None)
    finish_distributed()
    return metrics


if __name__ == "__main__":
    main()
