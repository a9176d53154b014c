"""Training utilities for the transformers `Trainer`: the momentum (EMA teacher) update of mPLUG pretraining."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.utils import logging

logger = logging.get_logger(__name__)


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


def self_critical_loss(
    model,
    pixel_values: torch.Tensor,
    references: Sequence[Sequence[str]],
    reward_fn: Callable[[list[str], list[list[str]]], Sequence[float]],
    decode_fn: Callable[[torch.Tensor], list[str]],
    num_beams: int = 5,
    max_new_tokens: int = 25,
    prompt_ids: torch.Tensor | None = None,
    forward_model=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""
    Self-critical sequence training loss for [`MPLUGForCaptioning`] (the original's SCST): each image's `num_beams`
    beam hypotheses are rewarded (e.g. CIDEr-D, [`~transformers_mplug.metrics.CiderD.scores`]) against its
    references; the advantage is the reward minus the mean reward of that image's beam, and
    `loss = -mean(advantage * log p(hypothesis))` with the log-probability summed over the hypothesis tokens.

    Args:
        model: the captioner (unwrapped) used to generate the hypotheses, without gradients.
        pixel_values (`(B, C, H, W)`): the images.
        references: the reference captions of each image.
        reward_fn: `(captions, references) -> rewards`, one caption/reference list per hypothesis.
        decode_fn: token ids (without the start token / prompt) -> strings, e.g. `processor.batch_decode`.
        prompt_ids (`(B, P)`, *optional*): a prompt the captions continue (no log-probability on it).
        forward_model: the module to run the differentiable forward with (e.g. the DDP/DeepSpeed wrapper);
            default `model`.

    Returns `(loss, rewards)` with rewards of shape `(B, num_beams)`.
    """
    if len(references) != pixel_values.shape[0]:
        raise ValueError(f"`references` has {len(references)} entries for {pixel_values.shape[0]} images.")
    if num_beams < 2:
        raise ValueError("`num_beams` must be >= 2: the baseline is the mean reward over the beam.")
    forward_model = model if forward_model is None else forward_model
    was_training = forward_model.training
    forward_model.eval()
    with torch.no_grad():
        sequences = model.generate(
            pixel_values=pixel_values,
            input_ids=prompt_ids,
            num_beams=num_beams,
            num_return_sequences=num_beams,
            max_new_tokens=max_new_tokens,
            min_new_tokens=1,
        )
    forward_model.train(was_training)
    prompt_length = 1 if prompt_ids is None else prompt_ids.shape[1]
    captions = decode_fn(sequences[:, prompt_length:])
    expanded = [list(r) for r in references for _ in range(num_beams)]
    rewards = torch.tensor(list(reward_fn(captions, expanded)), dtype=torch.float32, device=sequences.device)
    rewards = rewards.view(-1, num_beams)
    advantage = (rewards - rewards.mean(dim=1, keepdim=True)).view(-1)
    eos, pad = model.config.eos_token_id, model.config.pad_token_id
    is_eos = (sequences == eos).long()
    after_eos = (is_eos.cumsum(1) - is_eos) > 0  # beam padding after the first [SEP]
    labels = sequences.masked_fill(after_eos | (sequences == pad), -100)
    labels[:, :prompt_length] = -100
    outputs = forward_model(pixel_values=pixel_values.repeat_interleave(num_beams, dim=0), labels=labels)
    log_probability = -outputs.loss_per_sequence
    return -(advantage * log_probability).mean(), rewards


__all__ = ["MPLUGMomentumCallback", "self_critical_loss"]
