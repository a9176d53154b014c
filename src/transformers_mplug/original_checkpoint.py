"""Reading original AliceMind mPLUG checkpoints: configs from the original files and the key mapping.

The original models carry weights that never run (the CLIP text tower and projection, the fusion layers that are
built but skipped, the fusion embeddings, the cross-attention of connected layers) and training-only state
(momentum `*_m` copies, queues). The mapping drops and reports those, maps everything else, and fails naming
any key it cannot place.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .configuration_mplug import CONNECTED_ATTENTION, MPLUGConfig, cross_modal_schedule

_VISUAL = "visual_encoder.visual."

# original CLIP resblock names -> transformers' CLIPEncoderLayer names
_CLIP_BLOCK = {
    "attn.out_proj.": "self_attn.out_proj.",
    "ln_1.": "layer_norm1.",
    "ln_2.": "layer_norm2.",
    "mlp.c_fc.": "mlp.fc1.",
    "mlp.c_proj.": "mlp.fc2.",
}
_CLIP_TOP = {
    "class_embedding": "embeddings.class_embedding",
    "positional_embedding": "embeddings.position_embedding.weight",
    "conv1.weight": "embeddings.patch_embedding.weight",
    "ln_pre.weight": "pre_layrnorm.weight",
    "ln_pre.bias": "pre_layrnorm.bias",
    "ln_post.weight": "post_layernorm.weight",
    "ln_post.bias": "post_layernorm.bias",
}
# buffers the original saves that transformers rebuilds (non-persistent here)
_REBUILT_BUFFERS = re.compile(r"(^|\.)embeddings\.position_ids$")
# training-only state
_QUEUES = re.compile(r"^(image_queue|text_queue|idx_queue|queue_ptr|video_queue)$")
_MOMENTUM = re.compile(r"^[a-z_]+_m\.")


@dataclass
class OriginalKeyMapping:
    """Result of mapping an original state dict: the new state dict and what was left out, by reason."""

    state_dict: dict[str, torch.Tensor]
    dropped: dict[str, list[str]] = field(default_factory=dict)
    unmapped: list[str] = field(default_factory=list)

    def drop(self, reason: str, key: str) -> None:
        self.dropped.setdefault(reason, []).append(key)


def unwrap_original_checkpoint(checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The model state dict inside an original checkpoint object (`{'model': ...}`, DeepSpeed `{'module': ...}`
    or a bare state dict), with `module.` prefixes removed."""
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f"`checkpoint` must be a dict loaded with torch.load, got {type(checkpoint).__name__}.")
    state = checkpoint
    for wrapper in ("model", "module", "state_dict"):
        if wrapper in state and isinstance(state[wrapper], Mapping):
            state = state[wrapper]
            break
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ValueError("No tensors found in the checkpoint: expected a state dict, or one under 'model'/'module'.")
    out = {}
    for key, value in tensors.items():
        while key.startswith("module."):
            key = key[len("module.") :]
        out[key] = value
    return out


def normalise_original_key(key: str) -> str:
    """Fold the pretraining files' wrapper prefixes into the fine-tuned layout."""
    key = re.sub(r"^text_encoder\.bert\.", "text_encoder.", key)
    key = re.sub(r"^fusion_encoder\.fusion\.", "fusion_encoder.", key)
    return key


def vision_config_from_state_dict(state_dict: Mapping[str, torch.Tensor], image_size: int | None = None) -> dict:
    """CLIP vision sizes read from the original tensor shapes (the original takes them from the CLIP file)."""
    try:
        conv = state_dict[_VISUAL + "conv1.weight"]
        pos = state_dict[_VISUAL + "positional_embedding"]
    except KeyError as err:
        raise ValueError(f"Not an mPLUG checkpoint: missing {err.args[0]!r}.") from None
    width, _, patch, _ = conv.shape
    layers = 1 + max(
        int(m.group(1))
        for k in state_dict
        if (m := re.match(rf"{re.escape(_VISUAL)}transformer\.resblocks\.(\d+)\.", k))
    )
    grid = int(round((pos.shape[0] - 1) ** 0.5))
    if grid * grid + 1 != pos.shape[0]:
        raise ValueError(f"Vision positional embedding has {pos.shape[0]} rows, which is not 1 + a square grid.")
    intermediate = state_dict[_VISUAL + "transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    return {
        "hidden_size": int(width),
        "intermediate_size": int(intermediate),
        "num_hidden_layers": layers,
        "num_attention_heads": max(int(width) // 64, 1),
        "patch_size": int(patch),
        "image_size": int(image_size) if image_size is not None else grid * int(patch),
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "attention_dropout": 0.1,
    }


def config_from_original(
    bert_config: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor], image_size: int | None = None
) -> MPLUGConfig:
    """Build an [`MPLUGConfig`] from an original `config_bert*.json` dict and the checkpoint's tensor shapes.

    `image_size` is the task resolution (yaml `image_res`); by default the checkpoint's positional-embedding grid.
    """
    required = ("vocab_size", "hidden_size", "num_attention_heads", "intermediate_size", "text_encoder_layers")
    missing = [k for k in required if k not in bert_config]
    if missing:
        raise ValueError(f"`bert_config` lacks {missing}; pass the original config_bert*.json.")
    text = {
        "vocab_size": bert_config["vocab_size"],
        "hidden_size": bert_config["hidden_size"],
        "num_attention_heads": bert_config["num_attention_heads"],
        "intermediate_size": bert_config["intermediate_size"],
        "num_hidden_layers": bert_config["text_encoder_layers"],
        "max_position_embeddings": bert_config.get("max_position_embeddings", 512),
        "type_vocab_size": bert_config.get("type_vocab_size", 2),
        "layer_norm_eps": bert_config.get("layer_norm_eps", 1e-12),
        "hidden_act": bert_config.get("hidden_act", "gelu"),
        "hidden_dropout_prob": bert_config.get("hidden_dropout_prob", 0.1),
        "attention_probs_dropout_prob": bert_config.get("attention_probs_dropout_prob", 0.1),
        "pad_token_id": bert_config.get("pad_token_id", 0),
        "initializer_range": bert_config.get("initializer_range", 0.02),
    }
    schedule = cross_modal_schedule(int(bert_config.get("fusion_layers", 6)), int(bert_config.get("stride_layer", 3)))
    extra = {}
    if "vision_proj.weight" in state_dict:
        extra["projection_dim"] = int(state_dict["vision_proj.weight"].shape[0])
    if "temp" in state_dict:
        extra["itc_temperature"] = float(state_dict["temp"])
    return MPLUGConfig(
        **extra,
        vision_config=vision_config_from_state_dict(state_dict, image_size),
        text_config=text,
        cross_modal_layer_types=schedule,
        num_decoder_layers=int(bert_config.get("text_decode_layers", 12)),
        initializer_range=text["initializer_range"],
    )


def _map_clip(rest: str, value: torch.Tensor, out: dict[str, torch.Tensor], prefix: str) -> bool:
    if rest in _CLIP_TOP:
        out[prefix + _CLIP_TOP[rest]] = value
        return True
    m = re.match(r"transformer\.resblocks\.(\d+)\.(.+)$", rest)
    if not m:
        return False
    layer, name = m.groups()
    base = f"{prefix}encoder.layers.{layer}."
    if name in ("attn.in_proj_weight", "attn.in_proj_bias"):
        kind = "weight" if name.endswith("weight") else "bias"
        for proj, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
            out[f"{base}self_attn.{proj}.{kind}"] = chunk.clone()
        return True
    for old, new in _CLIP_BLOCK.items():
        if name.startswith(old):
            out[base + new + name[len(old) :]] = value
            return True
    return False


def map_original_trunk_state_dict(
    state_dict: Mapping[str, torch.Tensor], config: MPLUGConfig, prefix: str = "", vision_only: bool = False
) -> OriginalKeyMapping:
    """Map the trunk part of an original mPLUG state dict onto [`MPLUGModel`] keys (with `prefix` in front).

    Keys outside the trunk (decoder, heads) are returned in `unmapped` for the caller to place or reject; dead and
    training-only weights are listed in `dropped` by reason. With `vision_only` (the captioner), the text encoder
    and the fusion, which the original captioner never runs, are dropped.
    """
    result = OriginalKeyMapping(state_dict={})
    out = result.state_dict
    schedule = config.cross_modal_layer_types
    fusion_keys = [k for k in map(normalise_original_key, state_dict) if k.startswith("fusion_encoder.encoder.layer.")]
    built = 1 + max((int(k.split(".")[3]) for k in fusion_keys), default=len(schedule) - 1)
    start = built - len(schedule)
    if start < 0:
        raise ValueError(
            f"The checkpoint has {built} fusion layers but the config runs {len(schedule)} "
            "(`cross_modal_layer_types`); check `fusion_layers` in the BERT config."
        )
    for raw_key, value in state_dict.items():
        key = normalise_original_key(raw_key)
        if _QUEUES.match(key) or _MOMENTUM.match(key):
            result.drop("training-only state (momentum copies, queues)", raw_key)
        elif key.startswith(_VISUAL):
            rest = key[len(_VISUAL) :]
            if rest == "proj":
                result.drop("CLIP projection (unused)", raw_key)
            elif not _map_clip(rest, value, out, prefix + "vision_model."):
                result.unmapped.append(raw_key)
        elif key.startswith("visual_encoder."):
            result.drop("CLIP text tower (unused)", raw_key)
        elif key.startswith(("visn_fc.", "visn_layer_norm.")):
            if not config.has_vision_projection:
                result.unmapped.append(raw_key)
                continue
            name = key.replace("visn_fc.", "dense.", 1).replace("visn_layer_norm.", "layer_norm.", 1)
            out[prefix + "vision_projection." + name] = value
        elif vision_only and key.startswith(("text_encoder.", "fusion_encoder.")):
            result.drop("text encoder / fusion (never run by the captioner)", raw_key)
        elif key.startswith("text_encoder."):
            rest = key[len("text_encoder.") :]
            if _REBUILT_BUFFERS.search(rest):
                result.drop("buffers rebuilt by transformers", raw_key)
            elif rest.startswith("pooler."):
                result.drop("text-encoder pooler (unused)", raw_key)
            elif rest.startswith(("embeddings.", "encoder.layer.")):
                out[prefix + "text_model." + rest] = value
            else:
                result.unmapped.append(raw_key)
        elif key.startswith("fusion_encoder."):
            rest = key[len("fusion_encoder.") :]
            m = re.match(r"encoder\.layer\.(\d+)\.(.+)$", rest)
            if m is None:
                if rest.startswith(("embeddings.", "pooler.")):
                    result.drop("fusion embeddings/pooler (never run)", raw_key)
                else:
                    result.unmapped.append(raw_key)
                continue
            index, name = int(m.group(1)), m.group(2)
            if index < start:
                result.drop("fusion layers built but never run", raw_key)
                continue
            j = index - start
            if schedule[j] == CONNECTED_ATTENTION and name.startswith("crossattention."):
                result.drop("cross-attention of connected-attention layers (unused)", raw_key)
                continue
            out[f"{prefix}cross_modal_encoder.layer.{j}.{name}"] = value
        else:
            result.unmapped.append(raw_key)
    return result


TASKS = ("trunk", "vqa", "caption", "retrieval", "grounding")
_RETRIEVAL_KEYS = ("temp", "vision_proj", "text_proj", "itm_head")


def map_original_state_dict(
    state_dict: Mapping[str, torch.Tensor], config: MPLUGConfig, task: str
) -> OriginalKeyMapping:
    """Map an original task state dict onto our class for `task`: `"trunk"` ([`MPLUGModel`]), `"vqa"`
    ([`MPLUGForQuestionAnswering`]), `"caption"` ([`MPLUGForCaptioning`]), `"retrieval"` ([`MPLUGForRetrieval`])
    or `"grounding"` ([`MPLUGForGrounding`])."""
    if task not in TASKS:
        raise ValueError(f"`task` must be one of {TASKS}, got {task!r}.")
    if task == "trunk":
        return map_original_trunk_state_dict(state_dict, config)
    mapping = map_original_trunk_state_dict(state_dict, config, prefix="mplug.", vision_only=task == "caption")
    unmapped, mapping.unmapped = mapping.unmapped, []
    for raw_key in unmapped:
        key = normalise_original_key(raw_key)
        value = state_dict[raw_key]
        if key in _RETRIEVAL_KEYS or key.startswith(tuple(k + "." for k in _RETRIEVAL_KEYS)):
            if task == "retrieval":
                mapping.state_dict[key] = value
            else:
                mapping.drop("retrieval projections (unused by this task)", raw_key)
        elif task == "grounding" and key in ("prefix_ids", "target_ids", "bbox_prob_mask"):
            mapping.drop("grounding token buffers (rebuilt from the config)", raw_key)
        elif task in ("vqa", "caption", "grounding") and key.startswith("text_decoder."):
            rest = key[len("text_decoder.") :]
            if _REBUILT_BUFFERS.search(rest):
                mapping.drop("buffers rebuilt by transformers", raw_key)
            elif rest.startswith(("bert.embeddings.", "bert.encoder.layer.", "cls.predictions.")):
                mapping.state_dict["text_decoder." + rest] = value
            else:
                mapping.unmapped.append(raw_key)
        else:
            mapping.unmapped.append(raw_key)
    return mapping


def load_original_state_dict(
    model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], task: str
) -> OriginalKeyMapping:
    """Map an original state dict for `task` (see [`map_original_state_dict`]) and load it strictly into `model`."""
    mapping = map_original_state_dict(state_dict, model.config, task)
    if mapping.unmapped:
        raise ValueError(
            f"{len(mapping.unmapped)} original key(s) cannot be placed in {type(model).__name__}: {mapping.unmapped}"
        )
    check_and_load(model, mapping.state_dict)
    return mapping


def load_original_trunk(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor]) -> OriginalKeyMapping:
    """Map an original state dict onto an [`MPLUGModel`] and load it strictly.

    Raises `ValueError` naming any original key that has no place in the trunk (pass only trunk keys, or use a
    task head's loader) and any model weight the checkpoint lacks.
    """
    mapping = map_original_trunk_state_dict(state_dict, model.config)
    if mapping.unmapped:
        raise ValueError(f"{len(mapping.unmapped)} original key(s) cannot be placed in MPLUGModel: {mapping.unmapped}")
    check_and_load(model, mapping.state_dict)
    return mapping


def check_and_load(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Strict load with shape checks and errors that name every missing/unexpected/mis-shaped key."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise ValueError(f"Checkpoint does not match the model. Missing: {missing}. Unexpected: {unexpected}.")
    bad = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state_dict.items()
        if tuple(v.shape) != tuple(expected[k].shape)
    ]
    if bad:
        raise ValueError(f"Shape mismatch for {len(bad)} key(s): {bad}")
    cast = {k: v.to(expected[k].dtype) if expected[k].is_floating_point() else v for k, v in state_dict.items()}
    model.load_state_dict(cast, strict=True)


__all__ = [
    "OriginalKeyMapping",
    "unwrap_original_checkpoint",
    "config_from_original",
    "vision_config_from_state_dict",
    "map_original_trunk_state_dict",
    "map_original_state_dict",
    "load_original_state_dict",
    "load_original_trunk",
    "check_and_load",
]
