"""The original mPLUG beam search as a decoding mode of `generate()`.

mPLUG's published numbers come from the beam search of the original code (AliceMind `models/predictor.py`), which is
not transformers' beam search:

- hypotheses are ranked by the GNMT length penalty: `score = sum(log p) / ((5 + n) / 6) ** 0.6` with `n` the number
  of generated tokens, and the running score is carried as `score * penalty`;
- a beam that emits `[SEP]` is recorded as a finished hypothesis but keeps running;
- an item ends as soon as its best beam has finished (every beam then counts as finished), and at the last step
  every beam counts as finished;
- an item's hypotheses are sorted by score and the best `num_return_sequences` are returned.

[`original_beam_search`] runs this algorithm as the decoding method of `GenerationMixin.generate` (transformers'
`custom_generate` hook, so generation configs, logits processors, the KV cache and output classes are transformers'
own). The mPLUG decoder heads select it with `generation_config.decoding_mode = "original"`, the default of their
generation configs; `decoding_mode="transformers"` runs transformers' own greedy/beam/sampling decoding.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, fields

import torch
from transformers import GenerationConfig
from transformers.generation import GenerateBeamDecoderOnlyOutput
from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria
from transformers.utils import logging

logger = logging.get_logger(__name__)

ORIGINAL = "original"
TRANSFORMERS = "transformers"
DECODING_MODES = (ORIGINAL, TRANSFORMERS)
# the GNMT length-penalty exponent of the original `TextGenerator` (`self.alpha = 0.6`)
GNMT_ALPHA = 0.6
_CACHE_NAMES = ("cache", "past_key_values")
# transformers >= 5.24 names the returned cache `cache`, earlier 5.x releases `past_key_values`
_OUTPUT_CACHE_FIELD = next(f.name for f in fields(GenerateBeamDecoderOnlyOutput) if f.name in _CACHE_NAMES)


def gnmt_length_penalty(num_generated_tokens: int | torch.Tensor) -> float | torch.Tensor:
    """The original's length penalty `((5 + n) / 6) ** 0.6` for `n` generated tokens (hypothesis score =
    cumulative log-probability / penalty)."""
    return ((5.0 + num_generated_tokens) / 6.0) ** GNMT_ALPHA


@dataclass
class MPLUGBeamSearchOutput(GenerateBeamDecoderOnlyOutput):
    r"""
    Output of the original beam search ([`original_beam_search`]) when `return_dict_in_generate=True`: transformers'
    [`~generation.GenerateBeamDecoderOnlyOutput`] (`sequences`, `sequences_scores` = the original's hypothesis
    scores, per-step `scores`, `beam_indices`, ...) plus:

    Args:
        sequence_lengths (`torch.LongTensor` of shape `(batch_size * num_return_sequences,)`):
            Number of valid ids of each returned sequence (prompt included); the rest is `pad_token_id`. A hypothesis
            recorded when its beam had emitted `[SEP]` earlier keeps the tokens generated after it, as the original.
    """

    sequence_lengths: torch.LongTensor | None = None


def resolve_decoding_mode(generation_config: GenerationConfig, kwargs: dict) -> str:
    """Pop `decoding_mode` from `kwargs` (else read it from the config), validate it and write it into the config.

    A config without the setting (e.g. a `generation_config.json` written before it existed, or a plain
    `GenerationConfig()` passed by the caller) decodes with transformers' own methods, as such folders always did.
    """
    mode = kwargs.pop("decoding_mode", None)
    if mode is None:
        mode = getattr(generation_config, "decoding_mode", None) or TRANSFORMERS
    if mode not in DECODING_MODES:
        raise ValueError(
            f"`decoding_mode` must be one of {list(DECODING_MODES)}, got {mode!r}: 'original' is the beam search of "
            "the original mPLUG code (the published numbers), 'transformers' is transformers' own greedy/beam/sampling."
        )
    generation_config.decoding_mode = mode
    return mode


def validate_decoding(
    generation_config: GenerationConfig, prompt_length: int, max_positions: int, mode: str, extra: dict
) -> None:
    """Errors naming the argument for settings that cannot run (both modes), or that the original mode has no
    equivalent for (instead of ignoring them)."""
    num_beams = generation_config.num_beams if generation_config.num_beams is not None else 1
    if not isinstance(num_beams, int) or isinstance(num_beams, bool) or num_beams < 1:
        raise ValueError(f"`num_beams` must be an int >= 1, got {num_beams!r}.")
    max_new = generation_config.max_new_tokens
    if max_new is None and generation_config.max_length is not None:
        max_new = generation_config.max_length - prompt_length
    if max_new is None or max_new < 1:
        raise ValueError(
            f"`max_new_tokens` must be >= 1 (got {generation_config.max_new_tokens!r}, `max_length` "
            f"{generation_config.max_length!r} with a prompt of {prompt_length} tokens)."
        )
    min_new = generation_config.min_new_tokens
    if min_new is not None and (min_new < 0 or min_new > max_new):
        raise ValueError(f"`min_new_tokens` ({min_new}) must be between 0 and `max_new_tokens` ({max_new}).")
    min_length = generation_config.min_length
    if min_length and min_length > prompt_length + max_new:
        raise ValueError(
            f"`min_length` ({min_length}) exceeds the longest possible sequence ({prompt_length} prompt tokens + "
            f"`max_new_tokens` {max_new})."
        )
    # the last generated token is never fed back, so the decoder sees at most prompt + max_new - 1 positions
    if prompt_length + max_new - 1 > max_positions:
        raise ValueError(
            f"`max_new_tokens` ({max_new}) with a prompt of {prompt_length} tokens needs "
            f"{prompt_length + max_new - 1} decoder positions, but the decoder has {max_positions} "
            f"(`max_position_embeddings`); lower `max_new_tokens` to at most {max_positions - prompt_length + 1}."
        )
    if mode != ORIGINAL:
        return
    if generation_config.do_sample:
        raise ValueError(
            "`do_sample=True` is not part of the original beam search (decoding_mode='original'); pass "
            "decoding_mode='transformers' to sample."
        )
    if (generation_config.num_beam_groups or 1) > 1 or generation_config.diversity_penalty:
        raise ValueError("Group/diverse beam search is not the original beam search; use decoding_mode='transformers'.")
    if generation_config.length_penalty not in (None, 1.0) or generation_config.early_stopping not in (None, False):
        raise ValueError(
            "`length_penalty`/`early_stopping` configure transformers' beam search; the original beam search "
            f"(decoding_mode='original') always ranks by the GNMT penalty ((5 + n) / 6) ** {GNMT_ALPHA} and ends an "
            "item when its best beam ends. Pass decoding_mode='transformers' to use them."
        )
    for name in ("streamer", "assistant_model", "stopping_criteria", "negative_prompt_ids"):
        if extra.get(name) is not None:
            raise ValueError(
                f"`{name}` is not supported by the original beam search (decoding_mode='original'); pass "
                "decoding_mode='transformers' to use it."
            )
    for name in ("max_time", "stop_strings"):
        if getattr(generation_config, name, None) is not None:
            raise ValueError(
                f"`{name}` is not supported by the original beam search (decoding_mode='original'); pass "
                "decoding_mode='transformers' to use it."
            )


def _eos_ids(generation_config: GenerationConfig, device: torch.device) -> torch.Tensor:
    eos = generation_config.eos_token_id
    if eos is None:
        raise ValueError("The original beam search needs `eos_token_id` ([SEP]) in the generation config.")
    return torch.tensor([eos] if isinstance(eos, int) else list(eos), device=device)


def _pad(rows: list[torch.Tensor], value: int) -> torch.Tensor:
    width = max(row.shape[0] for row in rows)
    out = rows[0].new_full((len(rows), width), value)
    for index, row in enumerate(rows):
        out[index, : row.shape[0]] = row
    return out


def original_beam_search(
    model,
    input_ids: torch.LongTensor,
    logits_processor,
    stopping_criteria,
    generation_config: GenerationConfig,
    **model_kwargs,
) -> MPLUGBeamSearchOutput | torch.LongTensor:
    r"""
    The original mPLUG beam search, as a decoding method of `GenerationMixin.generate` (pass it as
    `custom_generate`; the mPLUG heads do so when `generation_config.decoding_mode == "original"`).

    For `step = 0 .. max_new_tokens - 1`: `log p = log(softmax(logits))` of the last position, processed by the
    logits processors (`min_new_tokens` bans `[SEP]`), plus the running beam score; the top `num_beams` of
    `(log p) / penalty(step + 1)` over beams x vocabulary are kept per item and their running score becomes
    `score * penalty`. A beam whose new token is `[SEP]` is recorded as a hypothesis (and keeps running); when the
    best beam of an item has finished, or at the last step, all its beams are recorded and the item ends. With one
    beam this is greedy decoding. Incremental with the KV cache when `use_cache` (the cache is reordered with the
    beams; the memory's cross-attention keys/values are shared per image, see `MPLUGSharedMemoryCache`); without a
    cache the decoder re-runs the whole prefix at every step, as the original.

    Args:
        model: the decoder (`BertLMHeadModel`) whose `generate` called this.
        input_ids (`(batch_size * num_beams, prompt_length)`): the prompts, repeated per beam by `generate`.
        logits_processor, stopping_criteria, generation_config: as prepared by `generate`.
        model_kwargs: `encoder_hidden_states`, `encoder_attention_mask`, the cache, `use_cache`, ... from `generate`.

    Returns:
        `sequences` `(batch_size * num_return_sequences, length)` best first per item (prompt included, padded with
        `pad_token_id`), or an [`MPLUGBeamSearchOutput`] with `return_dict_in_generate=True`.
    """
    for criterion in stopping_criteria or []:
        if not isinstance(criterion, (MaxLengthCriteria, EosTokenCriteria)):
            raise ValueError(
                f"The original beam search (decoding_mode='original') cannot apply {type(criterion).__name__}; pass "
                "decoding_mode='transformers' to use it."
            )
    num_beams = generation_config.num_beams or 1
    num_return = generation_config.num_return_sequences or 1
    if num_return > num_beams:
        raise ValueError(f"`num_return_sequences` ({num_return}) must be <= `num_beams` ({num_beams}).")
    rows, prompt_length = input_ids.shape
    if rows % num_beams:
        raise ValueError(f"{rows} decoder rows are not a multiple of `num_beams` ({num_beams}).")
    batch_size = rows // num_beams
    steps = generation_config.max_length - prompt_length
    device = input_ids.device
    eos = _eos_ids(generation_config, device)
    pad = generation_config.pad_token_id if generation_config.pad_token_id is not None else int(eos[0])
    return_dict = generation_config.return_dict_in_generate
    output_scores = return_dict and generation_config.output_scores
    output_logits = return_dict and generation_config.output_logits
    output_attentions = return_dict and generation_config.output_attentions
    output_hidden_states = return_dict and generation_config.output_hidden_states

    cache = next((model_kwargs[name] for name in _CACHE_NAMES if model_kwargs.get(name) is not None), None)
    use_cache = bool(model_kwargs.get("use_cache", True)) and cache is not None
    cache_name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    forward_kwargs = {
        "encoder_hidden_states": model_kwargs["encoder_hidden_states"],
        "encoder_attention_mask": model_kwargs.get("encoder_attention_mask"),
        "use_cache": use_cache,
        "return_dict": True,
    }
    if output_attentions:
        forward_kwargs["output_attentions"] = True
    if output_hidden_states:
        forward_kwargs["output_hidden_states"] = True
    if use_cache:
        forward_kwargs[cache_name] = cache
    else:
        cache = None

    # the first beam of each item holds all the probability at the start
    beam_scores = torch.zeros(batch_size, num_beams, device=device)
    beam_scores[:, 1:] = float("-inf")
    beam_scores = beam_scores.view(-1)
    offsets = torch.arange(batch_size, device=device).mul_(num_beams)
    alive = input_ids
    history = input_ids.new_zeros(rows, 0)  # flat row of the beam each token was chosen from (beam_indices)
    hypotheses: list[list[tuple[float, torch.Tensor, torch.Tensor, torch.Tensor]]] = [[] for _ in range(batch_size)]
    results: list[list | None] = [None] * batch_size
    done = torch.zeros(batch_size, dtype=torch.bool, device=device)
    all_scores, raw_logits, attentions, hidden_states = (), (), (), ()

    for step in range(steps):
        fed = alive[:, -1:] if use_cache and step > 0 else alive
        outputs = model(input_ids=fed, **forward_kwargs)
        logits = outputs.logits[:, -1, :].float()
        # the original's log(softmax(.)), not log_softmax: equal up to rounding, and the rounding picks the beams
        log_probs = torch.log(torch.softmax(logits, dim=-1))
        log_probs = logits_processor(alive, log_probs)
        if output_scores:
            all_scores += (log_probs.clone(),)
        if output_logits:
            raw_logits += (logits.clone(),)
        if output_attentions:
            attentions += (outputs.attentions,)
        if output_hidden_states:
            hidden_states += (outputs.hidden_states,)
        del outputs
        vocab_size = log_probs.shape[-1]
        penalty = gnmt_length_penalty(step + 1)
        candidates = (log_probs + beam_scores[:, None]) / penalty
        top_scores, top_ids = candidates.view(batch_size, num_beams * vocab_size).topk(num_beams, dim=-1)
        beam_scores = (top_scores * penalty).view(-1)
        parents = torch.div(top_ids, vocab_size, rounding_mode="floor")
        tokens = top_ids.fmod(vocab_size)
        select = (parents + offsets[:, None]).view(-1)
        alive = torch.cat([alive.index_select(0, select), tokens.view(-1, 1)], dim=-1)
        history = torch.cat([history.index_select(0, select), select.view(-1, 1)], dim=-1)

        finished = torch.isin(tokens, eos)
        if step + 1 == steps:
            finished.fill_(True)
        ends = finished[:, 0] & ~done
        finished &= ~done[:, None]
        finished |= ends[:, None]
        if bool(finished.any()):
            for item, beam in finished.nonzero().tolist():
                row = item * num_beams + beam
                hypotheses[item].append(
                    (float(top_scores[item, beam]), top_scores[item, beam], alive[row], history[row])
                )
            for item in ends.nonzero().view(-1).tolist():
                ranked = sorted(hypotheses[item], key=lambda hypothesis: hypothesis[0], reverse=True)
                results[item] = ranked[:num_return]
            done |= ends
            if bool(done.all()):
                break
        if use_cache:
            cache.reorder_cache(select)

    best = [hypothesis for item in results for hypothesis in item]
    lengths = torch.tensor([h[2].shape[0] for h in best], device=device)
    sequences = _pad([h[2] for h in best], pad)
    if not return_dict:
        return sequences
    beam_indices = _pad([h[3] for h in best], -1)
    return MPLUGBeamSearchOutput(
        sequences=sequences,
        sequences_scores=torch.stack([h[1] for h in best]) if output_scores else None,
        scores=all_scores if output_scores else None,
        logits=raw_logits if output_logits else None,
        beam_indices=beam_indices,
        attentions=attentions if output_attentions else None,
        hidden_states=hidden_states if output_hidden_states else None,
        sequence_lengths=lengths,
        **{_OUTPUT_CACHE_FIELD: cache},
    )


__all__ = [
    "DECODING_MODES",
    "MPLUGBeamSearchOutput",
    "gnmt_length_penalty",
    "original_beam_search",
]
