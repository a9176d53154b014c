#!/usr/bin/env python
"""Fine-tune mPLUG for image captioning with the transformers Trainer: cross-entropy training, then optionally
self-critical sequence training (`--scst`: CIDEr-D reward of beam hypotheses, baseline = mean reward over the beam).

With no arguments it trains a small captioner from scratch on the embedded "shapes" scenes (offline, CPU), reports
BLEU-1..4 and CIDEr-D on held-out images, saves the model, processor and generation config, and writes metrics JSON and
a plot.

    accelerate launch examples/run_captioning.py
    accelerate launch examples/run_captioning.py --model_name_or_path mplug-base-caption --scst \\
        --train_file captions.json --image_root images/ --learning_rate 1e-5

Data: the embedded scenes, `--dataset_name`, `--train_file/--validation_file` (JSON/CSV with `--image_column` and
`--caption_column`, image paths under `--image_root`), or `--annotation_format alicemind` for the original caption
annotation JSON (`[{"image": path, "caption": str or [str, ...]}]`, one row per caption, all captions of an image as
its references).
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
    evaluation_decoding,
    finish_distributed,
    load_task_data,
    parse_with_defaults,
    plot_curves,
    read_caption_annotations,
    start_run,
)
from transformers import Trainer, TrainingArguments

from transformers_mplug import MPLUGForCaptioning, MPLUGProcessor
from transformers_mplug.data import MPLUGCaptioningCollator, load_shapes_dataset
from transformers_mplug.metrics import CiderD, caption_metrics
from transformers_mplug.training import self_critical_loss

logger = logging.getLogger("run_captioning")

DEMO_DEFAULTS = demo_defaults("run_captioning", epochs=6, learning_rate="5e-4")


@dataclass
class ModelArguments(DemoModelArguments):
    eval_num_beams: int = field(default=1, metadata={"help": "beams when scoring held-out captions"})
    eval_decoding_mode: str = field(
        default="original",
        metadata={"help": "'original' (the original mPLUG beam search) or 'transformers'; saved with the model"},
    )
    max_new_tokens: int = field(default=25)
    min_new_tokens: int | None = field(default=None, metadata={"help": "default: the model's (the original's 8)"})
    scst: bool = field(default=False, metadata={"help": "self-critical training with the CIDEr-D reward"})
    scst_num_beams: int = field(default=5, metadata={"help": "hypotheses per image in SCST (the beam)"})


@dataclass
class DataArguments(DemoDataArguments):
    annotation_format: str = field(default="columns", metadata={"help": "'columns' or 'alicemind'"})
    image_column: str = field(default="image")
    caption_column: str = field(default="caption")
    prompt: str = field(default="", metadata={"help": "text the decoder starts from (no loss on it)"})
    max_length: int = field(default=30)


def _alicemind_rows(path: str) -> list[dict]:
    """The original caption annotations: one row per caption, every caption of the image as its references."""
    return [
        {"image": image, "caption": caption, "references": captions}
        for image, captions in read_caption_annotations(path)
        for caption in captions
    ]


def load_data(data_args: DataArguments, image_size: int):
    return load_task_data(
        data_args,
        (data_args.image_column, data_args.caption_column),
        lambda: load_shapes_dataset(data_args.num_train_examples, data_args.num_eval_examples, image_size=image_size),
        (data_args.image_column,),
        _alicemind_rows,
        "alicemind",
    )


def references_of(dataset, data_args: DataArguments) -> list[list[str]]:
    if "references" in dataset.column_names:
        return [list(r) for r in dataset["references"]]
    return [[c] for c in dataset[data_args.caption_column]]


def build_model(model_args: ModelArguments, output_dir: Path) -> tuple[MPLUGForCaptioning, MPLUGProcessor]:
    if model_args.model_name_or_path:
        model = MPLUGForCaptioning.from_pretrained(model_args.model_name_or_path)
        return model, MPLUGProcessor.from_pretrained(model_args.model_name_or_path)
    processor = demo_processor(output_dir, model_args.image_size, model_args.vocab_path)
    config = model_args.fresh_config(len(processor.tokenizer))
    return MPLUGForCaptioning(config), processor


class CaptioningCollator(MPLUGCaptioningCollator):
    """The library collator plus each image's reference captions (for the SCST reward)."""

    def __init__(self, *args, references_column: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.references_column = references_column

    def __call__(self, rows):
        batch = super().__call__(rows)
        column = self.references_column
        batch["references"] = [list(r[column]) if column and column in r else [r[self.columns[1]]] for r in rows]
        return batch


class CaptioningTrainer(Trainer):
    """Cross-entropy or self-critical training; evaluation adds BLEU-1..4 and CIDEr-D of generated captions."""

    def __init__(self, *args, processor=None, model_args=None, data_args=None, cider=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.caption_processor, self.model_args, self.data_args = processor, model_args, data_args
        self.cider = cider
        self._rewards: list[float] = []

    def _prompt_ids(self, batch_size: int, device) -> torch.Tensor | None:
        if not self.data_args.prompt:
            return None
        ids = self.caption_processor.encode_text(self.data_args.prompt, return_tensors="pt")["input_ids"]
        return ids.expand(batch_size, -1).to(device)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        references = inputs.pop("references")
        if not self.model_args.scst or not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        return self._scst_loss(model, inputs, references, return_outputs)

    def _scst_loss(self, model, inputs, references, return_outputs):
        pixel_values = inputs["pixel_values"]
        loss, rewards = self_critical_loss(
            self.accelerator.unwrap_model(model),
            pixel_values,
            references,
            self.cider.scores,
            self.caption_processor.batch_decode,
            num_beams=self.model_args.scst_num_beams,
            prompt_ids=self._prompt_ids(pixel_values.shape[0], pixel_values.device),
            forward_model=model,
        )
        self._rewards.append(float(rewards.mean()))
        return (loss, None) if return_outputs else loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs and self._rewards:
            logs["scst_reward"] = round(sum(self._rewards) / len(self._rewards), 4)
            self._rewards = []
        super().log(logs, *args, **kwargs)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        captions = generate_captions(
            self.model,
            self.caption_processor,
            dataset,
            self.data_args,
            self.args.per_device_eval_batch_size,
        )
        scores = caption_metrics(captions, references_of(dataset, self.data_args))
        scores = {f"{metric_key_prefix}_{k.replace('-', '_')}": v for k, v in scores.items()}
        self.log(scores)
        metrics.update(scores)
        return metrics


@torch.no_grad()
def generate_captions(model, processor, dataset, data_args, batch_size: int):
    """Captions decoded with the model's generation config (the script's evaluation decoding)."""
    model.eval()
    prompt = processor.encode_text(data_args.prompt, return_tensors="pt")["input_ids"] if data_args.prompt else None
    captions = []
    for start in range(0, len(dataset), batch_size):
        rows = dataset[start : start + batch_size]
        pixel_values = processor(images=rows[data_args.image_column])["pixel_values"].to(model.device)
        ids = None if prompt is None else prompt.expand(pixel_values.shape[0], -1).to(model.device)
        output = model.generate(pixel_values=pixel_values, input_ids=ids)
        captions += processor.batch_decode(output[:, 1 if prompt is None else prompt.shape[1] :])
    return captions


def main(argv: list[str] | None = None) -> dict:
    parser, (model_args, data_args, training_args) = parse_with_defaults(
        (ModelArguments, DataArguments, TrainingArguments), DEMO_DEFAULTS, sys.argv[1:] if argv is None else argv
    )
    if data_args.annotation_format not in ("columns", "alicemind"):
        parser.error("--annotation_format must be 'columns' or 'alicemind'")
    start_run(training_args)
    output_dir = Path(training_args.output_dir)
    model, processor = build_model(model_args, output_dir)
    # evaluation, SCST (its beam size aside) and the saved folder decode with this
    model.generation_config = evaluation_decoding(
        model,
        model_args.eval_decoding_mode,
        model_args.eval_num_beams,
        model_args.max_new_tokens,
        model_args.min_new_tokens,
    )
    raw = load_data(data_args, processor.image_processor.size["height"])
    references_column = "references" if "references" in raw["train"].column_names else None
    collator = CaptioningCollator(
        processor,
        data_args.image_column,
        data_args.caption_column,
        prompt=data_args.prompt,
        max_length=data_args.max_length,
        references_column=references_column,
    )
    cider = CiderD(references_of(raw["train"], data_args)) if model_args.scst else None
    trainer = CaptioningTrainer(
        model=model,
        args=training_args,
        train_dataset=raw["train"],
        eval_dataset=raw["validation"],
        data_collator=collator,
        processor=processor,
        model_args=model_args,
        data_args=data_args,
        cider=cider,
    )
    started = time.time()
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    train_seconds = time.time() - started
    metrics = trainer.evaluate()
    metrics.update(train_seconds=train_seconds, world_size=training_args.world_size, scst=model_args.scst)
    metrics["deepspeed_zero_stage"] = (
        trainer.accelerator.state.deepspeed_plugin.zero_stage if trainer.is_deepspeed_enabled else None
    )
    rewards = [e["scst_reward"] for e in trainer.state.log_history if "scst_reward" in e]
    if rewards:
        metrics["first_scst_reward"], metrics["last_scst_reward"] = rewards[0], rewards[-1]
    trainer.save_model(training_args.output_dir)
    if trainer.is_world_process_zero():
        processor.save_pretrained(training_args.output_dir)
        model.generation_config.save_pretrained(training_args.output_dir)
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
        plot_curves(trainer.state.log_history, "CIDEr_D", "mPLUG captioning", output_dir / "training_curves.png", None)
        logger.info(
            "held-out BLEU-4 %.3f, CIDEr-D %.3f after %.0f s",
            metrics["eval_BLEU_4"],
            metrics["eval_CIDEr_D"],
            train_seconds,
        )
    finish_distributed()
    return metrics


if __name__ == "__main__":
    main()
