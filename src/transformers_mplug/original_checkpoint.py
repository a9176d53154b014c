"""Reading original AliceMind mPLUG checkpoints: configs from the original files and the key mapping.

The original models carry weights that never run (the CLIP text tower and projection, the fusion layers that are
built but skipped, the fusion embeddings, the cross-attention of connected layers) and training-only state
(momentum `*_m` copies, queues). The mapping drops and reports those, maps everything else, and fails naming
any key it cannot place.
"""

from __future__ import annotations

import os
import pickle
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


def load_original_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load an original checkpoint file safely (`torch.load(..., weights_only=True)`) and return its model state
    dict: `{'model': ...}` training files (optimizer/scheduler/config entries are ignored), DeepSpeed
    `mp_rank_00_model_states.pt` files (`{'module': ...}`) or bare state dicts."""
    if os.path.isdir(path):
        raise ValueError(
            f"`checkpoint_path` {path} is a directory; pass the checkpoint file itself (an AliceMind .pth or a "
            "DeepSpeed mp_rank_00_model_states.pt)."
        )
    if not os.path.isfile(path):
        raise FileNotFoundError(f"`checkpoint_path` {path} does not exist.")
    try:
        with torch.serialization.safe_globals([set]):  # DeepSpeed writes a set of names
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError) as error:
        raise ValueError(
            f"`checkpoint_path` {path} cannot be read as a torch checkpoint (truncated or not a .pth file): {error}"
        ) from None
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{path} contains pickled objects other than tensors and plain containers, which are not loaded for "
            f"safety (torch.load(weights_only=True)). Re-save only the state dict, e.g. "
            f"torch.save({{'model': checkpoint['model']}}, path), from a trusted environment. Details: {error}"
        ) from None
    return unwrap_original_checkpoint(checkpoint)


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


GROUNDING_BUFFERS = ("bbox_prob_mask", "prefix_ids", "target_ids")


def detect_original_tasks(state_dict: Mapping[str, torch.Tensor]) -> tuple[set[str], str]:
    """The converter tasks an original state dict can be: `(tasks, what was found)`. VQA and captioning files can
    hold the same modules (captioning files often carry an unused text encoder and fusion), so some files allow
    both; an empty set means the keys name no task head."""
    keys = {normalise_original_key(k) for k in state_dict}

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    if any(name in keys for name in GROUNDING_BUFFERS):
        return {"grounding"}, "the grounding buffers (bbox_prob_mask / prefix_ids / target_ids)"
    decoder, itm = has("text_decoder."), has("itm_head.")
    mlm = has("text_encoder.cls.") or has("fusion_encoder.cls.")
    if itm and (decoder or mlm):
        return {"pretrained"}, "an ITM head with a decoder / MLM head (a pretraining checkpoint)"
    if itm:
        return {"retrieval"}, "an ITM head and ITC projections without a decoder (a retrieval checkpoint)"
    if decoder and has("text_decoder_m."):
        return {"vqa"}, "a decoder with momentum copies over the fused image and question (a VQA checkpoint)"
    if decoder and not has("text_encoder."):
        return {"caption"}, "a decoder on the image features only, no text encoder (a captioning checkpoint)"
    if decoder:
        return {"vqa", "caption"}, "a decoder with a text encoder and fusion (a VQA or captioning checkpoint)"
    return set(), "no task head (no decoder, ITM head or grounding buffers)"


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


def bert_config_from_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The original `config_bert*.json` values of a released model, read from its tensor shapes (for checkpoints
    converted without their BERT json). The released fusion runs 6 layers with connected attention every 3
    (base: ViT-B) or 6 (large: ViT-L) layers."""
    keys = [normalise_original_key(k) for k in state_dict]
    normalised = {normalise_original_key(k): v for k, v in state_dict.items()}

    def count(prefix: str) -> int:
        found = [int(m.group(1)) for k in keys if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))]
        return 1 + max(found) if found else 0

    embeddings = next(
        (
            normalised[k]
            for k in (
                "text_decoder.bert.embeddings.word_embeddings.weight",
                "text_encoder.embeddings.word_embeddings.weight",
            )
            if k in normalised
        ),
        None,
    )
    if embeddings is None:
        raise ValueError("Cannot read the BERT sizes from this checkpoint; pass its config_bert*.json.")
    intermediate = next(v for k, v in normalised.items() if k.endswith("layer.0.intermediate.dense.weight"))
    position = next(v for k, v in normalised.items() if k.endswith("embeddings.position_embeddings.weight"))
    vision_width = state_dict[_VISUAL + "conv1.weight"].shape[0] if _VISUAL + "conv1.weight" in state_dict else 0
    return {
        "vocab_size": int(embeddings.shape[0]),
        "hidden_size": int(embeddings.shape[1]),
        "num_attention_heads": int(embeddings.shape[1]) // 64,
        "intermediate_size": int(intermediate.shape[0]),
        "max_position_embeddings": int(position.shape[0]),
        "text_encoder_layers": count("text_encoder.encoder.layer.") or 6,
        "fusion_layers": 6,
        "stride_layer": 3 if vision_width <= 768 else 6,
        "text_decode_layers": count("text_decoder.bert.encoder.layer.") or 12,
    }


def config_from_original(
    bert_config: Mapping[str, Any] | None,
    state_dict: Mapping[str, torch.Tensor],
    image_size: int | None = None,
    task_config: Mapping[str, Any] | None = None,
) -> MPLUGConfig:
    """Build an [`MPLUGConfig`] from an original `config_bert*.json` dict (or, when `None`, the released models'
    values read from the tensor shapes), the checkpoint's tensor shapes and, optionally, the task yaml dict.

    `image_size` is the task resolution; by default the yaml `image_res`, else the checkpoint's positional grid.
    """
    task_config = dict(task_config or {})
    if bert_config is None:
        bert_config = bert_config_from_state_dict(state_dict)
    if image_size is None and task_config.get("image_res"):
        image_size = int(task_config["image_res"])
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
    elif task_config.get("embed_dim"):
        extra["projection_dim"] = int(task_config["embed_dim"])
    if "temp" in state_dict:
        extra["itc_temperature"] = float(state_dict["temp"])
    elif task_config.get("temp"):
        extra["itc_temperature"] = float(task_config["temp"])
    return MPLUGConfig(
        **extra,
        vision_config=vision_config_from_state_dict(state_dict, image_size),
        text_config=text,
        cross_modal_layer_types=schedule,
        num_decoder_layers=int(bert_config.get("text_decode_layers", 12)),
        initializer_range=text["initializer_range"],
    )


def resize_position_embedding(table: torch.Tensor, grid: int) -> torch.Tensor:
    """Resize a ViT positional table `(1 + g*g, D)` to `(1 + grid*grid, D)` as the original does when loading a
    checkpoint for another resolution: class row kept, the patch grid interpolated bilinearly
    (`align_corners=False`)."""
    if table.dim() != 2:
        raise ValueError(f"The positional table must be (1 + g*g, D), got {tuple(table.shape)}.")
    source = int(round((table.shape[0] - 1) ** 0.5))
    if source * source + 1 != table.shape[0]:
        raise ValueError(f"The positional table has {table.shape[0]} rows, not 1 + a square grid.")
    if source == grid:
        return table
    patches = table[1:].reshape(1, source, source, -1).permute(0, 3, 1, 2).float()
    resized = torch.nn.functional.interpolate(patches, size=(grid, grid), mode="bilinear", align_corners=False)
    resized = resized.permute(0, 2, 3, 1).reshape(grid * grid, -1).to(table.dtype)
    return torch.cat([table[:1], resized], dim=0)


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
            if rest == "positional_embedding":
                grid = config.vision_config.image_size // config.vision_config.patch_size
                value = resize_position_embedding(value, grid)
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


TASKS = ("trunk", "vqa", "caption", "retrieval", "grounding", "pretrained")
_MLM_HEAD = re.compile(r"^(text_encoder|fusion_encoder)\.cls\.predictions\.")
# momentum-encoder parameters of MPLUGForPreTraining and the student weights they start from
_TEACHER_SOURCES = {
    "momentum_encoder.vision_model.": "mplug.vision_model.",
    "momentum_encoder.vision_projection.": "mplug.vision_projection.",
    "momentum_encoder.text_model.": "mplug.text_model.",
    "momentum_encoder.vision_proj.": "vision_proj.",
    "momentum_encoder.text_proj.": "text_proj.",
}
_RETRIEVAL_KEYS = ("temp", "vision_proj", "text_proj", "itm_head")


def map_original_state_dict(
    state_dict: Mapping[str, torch.Tensor], config: MPLUGConfig, task: str
) -> OriginalKeyMapping:
    """Map an original task state dict onto our class for `task`: `"trunk"` ([`MPLUGModel`]), `"vqa"`
    ([`MPLUGForQuestionAnswering`]), `"caption"` ([`MPLUGForCaptioning`]), `"retrieval"` ([`MPLUGForRetrieval`]),
    `"grounding"` ([`MPLUGForGrounding`]) or `"pretrained"` ([`MPLUGForPreTraining`]: trunk, ITC/ITM heads, MLM
    head, decoder; the original momentum copies and queues are dropped, the teacher restarts as a copy of the
    student and the queues empty)."""
    if task not in TASKS:
        raise ValueError(f"`task` must be one of {TASKS}, got {task!r}.")
    if task == "trunk":
        return map_original_trunk_state_dict(state_dict, config)
    mapping = map_original_trunk_state_dict(state_dict, config, prefix="mplug.", vision_only=task == "caption")
    unmapped, mapping.unmapped = mapping.unmapped, []
    for raw_key in unmapped:
        key = normalise_original_key(raw_key)
        value = state_dict[raw_key]
        if task == "pretrained" and _MLM_HEAD.match(key):
            mapping.state_dict[_MLM_HEAD.sub("mlm_head.predictions.", key)] = value
        elif key in _RETRIEVAL_KEYS or key.startswith(tuple(k + "." for k in _RETRIEVAL_KEYS)):
            if task in ("retrieval", "pretrained"):
                mapping.state_dict[key] = value.reshape(1) if key == "temp" else value
            else:
                mapping.drop("retrieval projections (unused by this task)", raw_key)
        elif task == "grounding" and key in ("prefix_ids", "target_ids", "bbox_prob_mask"):
            mapping.drop("grounding token buffers (rebuilt from the config)", raw_key)
        elif task in ("vqa", "caption", "grounding", "pretrained") and key.startswith("text_decoder."):
            rest = key[len("text_decoder.") :]
            if _REBUILT_BUFFERS.search(rest):
                mapping.drop("buffers rebuilt by transformers", raw_key)
            elif rest.startswith(("bert.embeddings.", "bert.encoder.layer.", "cls.predictions.")):
                mapping.state_dict["text_decoder." + rest] = value
            else:
                mapping.unmapped.append(raw_key)
        else:
            mapping.unmapped.append(raw_key)
    if task == "pretrained":
        _add_fresh_training_state(mapping, config)
    return mapping


def _add_fresh_training_state(mapping: OriginalKeyMapping, config: MPLUGConfig) -> None:
    """MPLUGForPreTraining's teacher as a copy of the mapped student and empty ITC queues."""
    out = mapping.state_dict
    for key in list(out):
        for teacher, student in _TEACHER_SOURCES.items():
            if key.startswith(student) and not _REBUILT_BUFFERS.search(key):
                out[teacher + key[len(student) :]] = out[key].clone()
    queue = max(config.queue_size, 1)
    out["image_queue"] = torch.zeros(config.projection_dim, queue)
    out["text_queue"] = torch.zeros(config.projection_dim, queue)
    out["idx_queue"] = torch.full((1, queue), -100, dtype=torch.long)
    out["queue_ptr"] = torch.zeros((), dtype=torch.long)


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
    "load_original_checkpoint",
    "bert_config_from_state_dict",
    "resize_position_embedding",
    "unwrap_original_checkpoint",
    "config_from_original",
    "vision_config_from_state_dict",
    "map_original_trunk_state_dict",
    "map_original_state_dict",
    "load_original_state_dict",
    "load_original_trunk",
    "check_and_load",
]
