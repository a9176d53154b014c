"""Training utilities for the transformers `Trainer`: the momentum (EMA teacher) update of mPLUG pretraining with its
DeepSpeed ZeRO-3 handling, the cross-rank gathering of the ITC queues and of evaluation work split across ranks, and
the original self-critical (SCST) loss. (The modeling file uses no distributed API itself: it calls the helpers
here.)"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.utils import logging

from .generation_mplug import gnmt_length_penalty

logger = logging.get_logger(__name__)


def ema_update_(teacher: torch.Tensor, student: torch.Tensor, momentum: float, name: str = "") -> None:
    """`teacher <- momentum * teacher + (1 - momentum) * student` in place, for plain parameters and DeepSpeed ZeRO-3
    ones. A ZeRO-3 parameter keeps this rank's shard in `ds_tensor` and, while gathered (always for the small
    "persistent" ones), the full tensor in `.data`; teacher and student shards of one parameter share a layout."""
    shapes = [tuple(getattr(p, "ds_shape", p.shape)) for p in (teacher, student)]  # ZeRO-3: the full shape
    if shapes[0] != shapes[1]:
        raise ValueError(f"Momentum parameter {name}: teacher {shapes[0]} vs student {shapes[1]}.")
    if not hasattr(teacher, "ds_tensor"):
        teacher.data.mul_(momentum).add_(student.data.to(teacher.dtype), alpha=1.0 - momentum)
        return
    shard, numel = teacher.ds_tensor, teacher.ds_numel
    teacher_full, student_full = teacher.data.numel() == numel, student.data.numel() == student.ds_numel
    if teacher_full and student_full:
        teacher.data.mul_(momentum).add_(student.data.to(teacher.dtype), alpha=1.0 - momentum)
        if shard.untyped_storage().data_ptr() != teacher.data.untyped_storage().data_ptr():
            rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
            piece = teacher.data.reshape(-1)[rank * shard.numel() : (rank + 1) * shard.numel()]
            shard.reshape(-1)[: piece.numel()].copy_(piece)
        return
    shard.mul_(momentum).add_(student.ds_tensor.to(shard.dtype), alpha=1.0 - momentum)
    if teacher_full:  # refresh the gathered copy from every rank's updated shard
        world_size = torch.distributed.get_world_size()
        gathered = torch.empty(world_size * shard.numel(), dtype=shard.dtype, device=shard.device)
        torch.distributed.all_gather_into_tensor(gathered, shard.reshape(-1).contiguous())
        teacher.data.copy_(gathered[:numel].view_as(teacher.data))


def gather_across_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """`torch.cat` of `tensor` from every rank (no gradient), or `tensor` itself outside distributed runs."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return tensor
    world_size = torch.distributed.get_world_size()
    if world_size == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size)]
    torch.distributed.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


def rank_and_world_size() -> tuple[int, int]:
    """This process's rank and the number of processes of the `torch.distributed` group (`(0, 1)` outside one)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return 0, 1
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def shard_bounds(num_items: int, rank: int, world_size: int) -> tuple[int, int]:
    """`[start, stop)` of rank `rank`'s contiguous share of `num_items` items split as evenly as possible (the first
    `num_items % world_size` ranks take one more)."""
    base, extra = divmod(num_items, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def gather_rows_across_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """`torch.cat` over ranks, in rank order, of tensors whose first dimension may differ between ranks (the other
    dimensions and the dtype must agree); `tensor` itself outside distributed runs. The rows travel in a dtype that
    every backend carries (bf16/fp16 as fp32, exactly) and come back in `tensor.dtype`."""
    _, world_size = rank_and_world_size()
    if world_size == 1:
        return tensor
    device = tensor.device
    sizes = torch.tensor([tensor.shape[0]], device=device)
    all_sizes = [torch.empty_like(sizes) for _ in range(world_size)]
    torch.distributed.all_gather(all_sizes, sizes)
    counts = [int(size) for size in all_sizes]
    wire = tensor.float() if tensor.is_floating_point() and tensor.element_size() < 4 else tensor
    padded = wire.new_zeros((max(counts), *tensor.shape[1:]))
    padded[: tensor.shape[0]] = wire
    parts = [torch.empty_like(padded) for _ in range(world_size)]
    torch.distributed.all_gather(parts, padded.contiguous())
    return torch.cat([part[:count] for part, count in zip(parts, counts)], dim=0).to(tensor.dtype)


def gather_objects_across_ranks(items: list) -> list:
    """The concatenation, in rank order, of every rank's list of picklable objects (e.g. generated answers); `items`
    itself outside distributed runs."""
    _, world_size = rank_and_world_size()
    if world_size == 1:
        return list(items)
    gathered: list = [None] * world_size
    torch.distributed.all_gather_object(gathered, list(items))
    return [item for part in gathered for item in part]


class MPLUGMomentumCallback(TrainerCallback):
    r"""
    Momentum distillation for [`MPLUGForPreTraining`] under the `Trainer`: after every optimizer step the teacher
    (`model.momentum_encoder`) moves towards the student, `teacher <- m * teacher + (1 - m) * student`, with
    `m = momentum` (default `config.momentum`, 0.995).

    Works with a single process, DDP, and DeepSpeed ZeRO-2 and ZeRO-3: under ZeRO-3 each rank updates its own shard
    of every parameter (teacher and student shards of a parameter have the same layout), so no gathering is needed.

    Example:
        >>> from transformers_mplug.training import MPLUGMomentumCallback
        >>> callback = MPLUGMomentumCallback(momentum=0.995)
        >>> # Trainer(model=MPLUGForPreTraining(...), ..., callbacks=[callback])
    """

    def __init__(self, momentum: float | None = None) -> None:
        if momentum is not None and not 0.0 <= float(momentum) < 1.0:
            raise ValueError(f"`momentum` must be in [0, 1), got {momentum!r}.")
        self.momentum = momentum
        self.updates = 0

    @staticmethod
    def _pretraining_model(model):
        while not hasattr(model, "momentum_update") and hasattr(model, "module"):
            model = model.module  # DDP / DeepSpeed engine wrappers
        if not hasattr(model, "momentum_update"):
            raise TypeError(
                f"MPLUGMomentumCallback needs an MPLUGForPreTraining model, got {type(model).__name__}; remove the "
                "callback for other models."
            )
        return model

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kwargs
    ) -> None:
        if model is not None:
            self._pretraining_model(model)

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kwargs
    ) -> None:
        if model is None:
            raise ValueError("The Trainer passed no model to MPLUGMomentumCallback.on_step_end.")
        self._pretraining_model(model).momentum_update(self.momentum)
        self.updates += 1


def original_hypothesis_scores(
    model,
    pixel_values: torch.Tensor,
    sequences: torch.Tensor,
    sequence_lengths: torch.Tensor,
    prompt_length: int = 1,
) -> torch.Tensor:
    r"""
    The scores the original beam search gives its hypotheses, with gradients: `sum(log p(token | prefix)) /
    ((5 + n) / 6) ** 0.6` over the `n` tokens after the prompt, computed by one teacher-forced forward of `model` (so
    that it runs through a DDP/DeepSpeed wrapper). Equal to the `sequences_scores` of `generate(...,
    decoding_mode="original")` for the same model mode; the original self-critical training differentiates these.

    Args:
        model: the captioner (or its training wrapper).
        pixel_values (`(num_sequences, C, H, W)`): the image of each hypothesis (repeat per hypothesis).
        sequences (`(num_sequences, length)`), sequence_lengths (`(num_sequences,)`): `generate` output
            (`return_dict_in_generate=True`: `.sequences`, `.sequence_lengths`).
        prompt_length: ids before the generated tokens (1: `[CLS]`).
    """
    if sequences.dim() != 2 or sequence_lengths.shape != sequences.shape[:1]:
        raise ValueError(
            f"`sequences` must be (num_sequences, length) and `sequence_lengths` (num_sequences,), got "
            f"{tuple(sequences.shape)} and {tuple(sequence_lengths.shape)}."
        )
    if pixel_values.shape[0] != sequences.shape[0]:
        raise ValueError(
            f"`pixel_values` has {pixel_values.shape[0]} images for {sequences.shape[0]} sequences; repeat each image "
            "once per hypothesis (`pixel_values.repeat_interleave(num_return_sequences, 0)`)."
        )
    if int(sequence_lengths.min()) <= prompt_length:
        raise ValueError(f"Every sequence must be longer than the prompt ({prompt_length} ids).")
    config = getattr(model, "config", None) or model.module.config
    positions = torch.arange(sequences.shape[1], device=sequences.device)
    valid = positions[None, :] < sequence_lengths.to(sequences.device)[:, None]
    labels = sequences.masked_fill(~valid, -100)
    labels[:, :prompt_length] = -100
    outputs = model(
        pixel_values=pixel_values,
        input_ids=sequences.masked_fill(~valid, config.pad_token_id),
        attention_mask=valid.long(),
        labels=labels,
    )
    generated = (sequence_lengths.to(sequences.device) - prompt_length).to(outputs.loss_per_sequence.dtype)
    return -outputs.loss_per_sequence / gnmt_length_penalty(generated)


def self_critical_loss(
    model,
    pixel_values: torch.Tensor,
    references: Sequence[Sequence[str]],
    reward_fn: Callable[[list[str], list[list[str]]], Sequence[float]],
    decode_fn: Callable[[torch.Tensor], list[str]],
    num_beams: int = 5,
    max_new_tokens: int | None = None,
    prompt_ids: torch.Tensor | None = None,
    forward_model=None,
    min_new_tokens: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""
    Self-critical sequence training loss for [`MPLUGForCaptioning`], as the original SCST: each image's `num_beams`
    hypotheses of the original beam search (`decoding_mode="original"`) are rewarded (e.g. CIDEr-D,
    [`~transformers_mplug.metrics.CiderD.scores`]) against its references; the advantage is the reward minus the
    mean reward of that image's beam, and `loss = -mean(advantage * score / length)` with `score` the hypothesis's
    beam score with gradients ([`original_hypothesis_scores`]) and `length` its number of ids.

    Args:
        model: the captioner (unwrapped) used to search the hypotheses, in eval mode and without gradients.
        pixel_values (`(B, C, H, W)`): the images.
        references: the reference captions of each image.
        reward_fn: `(captions, references) -> rewards`, one caption/reference list per hypothesis.
        decode_fn: token ids (without the start token / prompt) -> strings, e.g. `processor.batch_decode`.
        num_beams: the beam size (= hypotheses per image).
        max_new_tokens, min_new_tokens: default: the model's generation config (the original's 25 / 8).
        prompt_ids (`(B, P)`, *optional*): a prompt the captions continue (no score on it).
        forward_model: the module to run the differentiable forward with (e.g. the DDP/DeepSpeed wrapper);
            default `model`.

    Returns `(loss, rewards)` with rewards of shape `(B, num_beams)`.
    """
    if len(references) != pixel_values.shape[0]:
        raise ValueError(f"`references` has {len(references)} entries for {pixel_values.shape[0]} images.")
    if not isinstance(num_beams, int) or num_beams < 2:
        raise ValueError("`num_beams` must be an int >= 2: the baseline is the mean reward over the beam.")
    forward_model = model if forward_model is None else forward_model
    lengths = {
        name: value
        for name, value in (("max_new_tokens", max_new_tokens), ("min_new_tokens", min_new_tokens))
        if value is not None
    }
    was_training = forward_model.training
    forward_model.eval()
    with torch.no_grad():
        output = model.generate(
            pixel_values=pixel_values,
            input_ids=prompt_ids,
            decoding_mode="original",
            num_beams=num_beams,
            num_return_sequences=num_beams,
            return_dict_in_generate=True,
            **lengths,
        )
    forward_model.train(was_training)
    sequences, sequence_lengths = output.sequences, output.sequence_lengths
    prompt_length = 1 if prompt_ids is None else prompt_ids.shape[1]
    captions = decode_fn(sequences[:, prompt_length:])
    expanded = [list(r) for r in references for _ in range(num_beams)]
    rewards = torch.tensor(list(reward_fn(captions, expanded)), dtype=torch.float32, device=sequences.device)
    rewards = rewards.view(-1, num_beams)
    advantage = (rewards - rewards.mean(dim=1, keepdim=True)).view(-1)
    scores = original_hypothesis_scores(
        forward_model, pixel_values.repeat_interleave(num_beams, dim=0), sequences, sequence_lengths, prompt_length
    )
    loss = -(scores / sequence_lengths.to(scores.dtype) * advantage).mean()
    return loss, rewards


__all__ = [
    "MPLUGMomentumCallback",
    "ema_update_",
    "gather_across_ranks",
    "gather_objects_across_ranks",
    "gather_rows_across_ranks",
    "rank_and_world_size",
    "shard_bounds",
    "original_hypothesis_scores",
    "self_critical_loss",
]
