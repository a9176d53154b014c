"""Run under `accelerate launch` (2 processes, DeepSpeed) by test_pretraining.py: a few Trainer steps of a tiny
MPLUGForPreTraining with MPLUGMomentumCallback, checking on every rank that the teacher follows the EMA formula
of the student weights seen after each step, and that the ITC queues hold the features of both ranks."""

from __future__ import annotations

import json
import sys

import deepspeed
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from transformers_mplug import MPLUGConfig, MPLUGForPreTraining, MPLUGMomentumCallback
from transformers_mplug.data import MPLUGPretrainingCollator, load_shapes_dataset
from transformers_mplug.processing_mplug import MPLUGProcessor

MOMENTUM, STEPS, BATCH, QUEUE = 0.9, 3, 4, 20


def gathered(parameters) -> list[torch.Tensor]:
    with deepspeed.zero.GatheredParameters(list(parameters), modifier_rank=None):
        return [p.detach().float().clone() for p in parameters]


class Recorder(TrainerCallback):
    """Records the (gathered) student weights after each optimizer step, before the momentum update runs."""

    def __init__(self):
        self.teacher0, self.students = None, []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.teacher0 = gathered([t for _, t, _ in model.momentum_parameter_pairs()])

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.students.append(gathered([s for _, _, s in model.momentum_parameter_pairs()]))


def main(deepspeed_config: str, vocab: str, output_dir: str) -> None:
    processor = MPLUGProcessor.from_vocab_file(vocab, image_size=32)
    config = MPLUGConfig(
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=16,
        ),
        text_config=dict(
            vocab_size=len(processor.tokenizer),
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
        ),
        num_cross_modal_layers=2,
        num_decoder_layers=1,
        projection_dim=16,
        queue_size=QUEUE,
        momentum=MOMENTUM,
    )
    args = TrainingArguments(
        output_dir=output_dir,
        deepspeed=deepspeed_config,
        per_device_train_batch_size=BATCH,
        max_steps=STEPS,
        learning_rate=1e-2,
        report_to="none",
        save_strategy="no",
        remove_unused_columns=False,
        logging_steps=1,
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
    )
    deepspeed.init_distributed(dist_backend="gloo")  # after TrainingArguments, as the example scripts
    torch.manual_seed(0)
    model = MPLUGForPreTraining(config)
    train = load_shapes_dataset(32, 4, image_size=32)["train"]
    train = train.add_column("idx", list(range(len(train))))
    recorder, momentum = Recorder(), MPLUGMomentumCallback()
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train,
        data_collator=MPLUGPretrainingCollator(processor, caption_column="description", idx_column="idx"),
        callbacks=[recorder, momentum],
    )
    trainer.train()

    expected = recorder.teacher0
    for student in recorder.students:
        expected = [MOMENTUM * t + (1 - MOMENTUM) * s for t, s in zip(expected, student)]
    teacher = gathered([t for _, t, _ in model.momentum_parameter_pairs()])
    student = recorder.students[-1]
    ema_error = max(float((a - b).abs().max()) for a, b in zip(teacher, expected))
    teacher_student_gap = max(float((a - b).abs().max()) for a, b in zip(teacher, student))
    names = [n for n, _, _ in model.momentum_parameter_pairs()]
    bad = [
        (n, float((a - b).abs().max()))
        for n, a, b in zip(names, teacher, expected)
        if float((a - b).abs().max()) > 1e-6
    ]
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    queues = [torch.empty_like(model.image_queue) for _ in range(world)]
    torch.distributed.all_gather(queues, model.image_queue.contiguous())
    filled = int((model.idx_queue >= 0).sum())
    report = {
        "rank": rank,
        "zero_stage": trainer.accelerator.state.deepspeed_plugin.zero_stage,
        "momentum_updates": momentum.updates,
        "steps": len(recorder.students),
        "ema_error": ema_error,
        "teacher_student_gap": teacher_student_gap,
        "queue_ptr": int(model.queue_ptr),
        "queue_filled": filled,
        "queues_equal_across_ranks": all(torch.equal(q, queues[0]) for q in queues),
        "world_size": world,
        "mismatched": bad[:10],
    }
    with open(f"{output_dir}/report_rank{rank}.json", "w") as handle:
        json.dump(report, handle)
    # leave together: a rank exiting while the other still holds the process group can abort at shutdown
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
