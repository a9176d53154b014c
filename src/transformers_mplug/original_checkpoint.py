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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .configuration_mplug import CONNECTED_ATTENTION, MPLUGConfig, cross_modal_schedule

_VISUAL = "visual_encoder.visual."

# buffers the original saves that transformers rebuilds (non-persistent here)
_REBUILT_BUFFERS = re.compile(r"(^|\.)embeddings\.position_ids$")


@dataclass
class OriginalKeyMapping:
    """Result of mapping an original state dict: the new state dict and what was left out, by reason."""

    state_dict: dict[str, torch.Tensor]
    dropped: dict[str, list[str]] = field(default_factory=dict)
    unmapped: list[str] = field(default_factory=list)

    def drop(self, reason: str, key: str) -> None:
        self.dropped.setdefault(reason, []).append(key)


def load_original_checkpoint(path: str | os.PathLike, mmap: bool = False) -> dict[str, torch.Tensor]:
    """Load an original checkpoint file safely (`torch.load(..., weights_only=True)`) and return its model state
    dict: `{'model': ...}` training files (optimizer/scheduler/config entries are ignored), DeepSpeed
    `mp_rank_00_model_states.pt` files (`{'module': ...}`) or bare state dicts.

    `mmap=True` maps the file instead of reading it (tensors are read when used; files in torch's legacy,
    non-zip format are read whole)."""
    if os.path.isdir(path):
        raise ValueError(
            f"`checkpoint_path` {path} is a directory; pass the checkpoint file itself (an AliceMind .pth or a "
            "DeepSpeed mp_rank_00_model_states.pt)."
        )
    if not os.path.isfile(path):
        raise FileNotFoundError(f"`checkpoint_path` {path} does not exist.")
    try:
        with torch.serialization.safe_globals([set]):  # DeepSpeed writes a set of names
            try:
                checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            except RuntimeError as error:
                if not (mmap and "mmap" in str(error)):
                    raise
                checkpoint = torch.load(path, map_location="cpu", weights_only=True)  # a legacy-format file
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
    for wrapper in ("model", "module", "state_dict"):  # nested as ModelScope reads them: model, then module
        if wrapper in state and isinstance(state[wrapper], Mapping):
            state = state[wrapper]
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ValueError("No tensors found in the checkpoint: expected a state dict, or one under 'model'/'module'.")
    out = {}
    for key, value in tensors.items():
        while key.startswith("module."):
            key = key[len("module.") :]
        out[key] = value
    return out


# ------------------------------------------------------------------------------------------------ ModelScope folders
# `configuration.json` task -> converter task
MODELSCOPE_TASKS = {
    "visual-question-answering": "vqa",
    "image-captioning": "caption",
    "image-text-retrieval": "retrieval",
}
# what ModelScope's `MPlugPreprocessor` does to texts: BERT's `[CLS] text [SEP]`, padded to 25 with truncation
MODELSCOPE_TEXT_KWARGS = {"padding": "max_length", "truncation": True, "max_length": 25}


@dataclass
class ModelScopeFolder:
    """A ModelScope mPLUG model folder, read: the task, the configs, the vocabulary and the weights (keys as
    AliceMind names them, without ModelScope's `model.` prefix)."""

    path: str
    task: str
    modelscope_task: str
    task_config: dict[str, Any]
    bert_config: dict[str, Any]
    vocab_file: str
    checkpoint_file: str
    state_dict: dict[str, torch.Tensor]


def is_modelscope_folder(path: str | os.PathLike) -> bool:
    """Whether `path` is a ModelScope model folder (a directory with `configuration.json`)."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "configuration.json"))


def read_modelscope_folder(path: str | os.PathLike) -> ModelScopeFolder:
    """Read a ModelScope mPLUG folder (`configuration.json`, `config.yaml`, the BERT json it names, `vocab.txt`,
    `pytorch_model.bin`) as ModelScope's `MPlug.from_pretrained` does, but strictly: a missing file, a task other
    than VQA / captioning / retrieval, a model type other than `mplug`, or a CLIP size in `config.yaml` that the
    weights contradict raises `ValueError` naming it. The weights load with `torch.load(weights_only=True)`,
    memory-mapped; `{'model': ...}` / `{'module': ...}` wrappers and the `model.` key prefix are removed."""
    import json

    import yaml

    folder = os.fspath(path)
    if not is_modelscope_folder(folder):
        raise ValueError(f"{folder} is not a ModelScope model folder (it has no configuration.json).")

    def required(name: str, why: str) -> str:
        file = os.path.join(folder, name)
        if not os.path.isfile(file):
            raise ValueError(f"The ModelScope folder {folder} lacks `{name}` ({why}).")
        return file

    try:
        with open(required("configuration.json", "task and model type"), encoding="utf-8") as handle:
            configuration = json.load(handle)
        with open(required("config.yaml", "the MPlugConfig"), encoding="utf-8") as handle:
            task_config = yaml.safe_load(handle)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise ValueError(f"A configuration file of {folder} cannot be parsed: {error}") from None
    if not isinstance(configuration, dict) or not isinstance(task_config, dict):
        raise ValueError(f"`configuration.json` and `config.yaml` of {folder} must be mappings.")
    modelscope_task = configuration.get("task")
    if modelscope_task not in MODELSCOPE_TASKS:
        raise ValueError(
            f"`configuration.json` of {folder} has task {modelscope_task!r}; the mPLUG tasks are "
            f"{sorted(MODELSCOPE_TASKS)}."
        )
    model_type = (configuration.get("model") or {}).get("type")
    if model_type != "mplug":
        raise ValueError(f"`configuration.json` of {folder} has model type {model_type!r}, not 'mplug'.")
    bert_name = task_config.get("bert_config", "config_bert.json")
    with open(required(os.path.basename(str(bert_name)), "the BERT config `config.yaml` names"), encoding="utf-8") as h:
        bert_config = json.load(h)
    for key in ("text_encoder_layers", "fusion_layers", "text_decode_layers"):
        if key not in bert_config:
            raise ValueError(
                f"`{os.path.basename(str(bert_name))}` of {folder} lacks `{key}` (an mPLUG BERT config has it)."
            )
    vocab_file = required("vocab.txt", "the WordPiece vocabulary")
    checkpoint_file = required("pytorch_model.bin", "the weights")
    state = load_original_checkpoint(checkpoint_file, mmap=True)
    state = {key[len("model.") :] if key.startswith("model.") else key: value for key, value in state.items()}
    _check_modelscope_clip(folder, task_config, state)
    return ModelScopeFolder(
        path=folder,
        task=MODELSCOPE_TASKS[modelscope_task],
        modelscope_task=modelscope_task,
        task_config=task_config,
        bert_config=bert_config,
        vocab_file=vocab_file,
        checkpoint_file=checkpoint_file,
        state_dict=state,
    )


def _check_modelscope_clip(folder: str, task_config: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> None:
    """The `clip_*` sizes of `config.yaml` must be the weights' (ModelScope builds the tower from them)."""
    if _VISUAL + "conv1.weight" not in state:
        raise ValueError(
            f"The weights of {folder} have no CLIP vision tower (`visual_encoder.visual.conv1.weight`): not an mPLUG "
            "checkpoint."
        )
    vision = vision_config_from_state_dict(state)
    for field_name, found in (
        ("clip_vision_width", vision["hidden_size"]),
        ("clip_vision_layers", vision["num_hidden_layers"]),
        ("clip_vision_patch_size", vision["patch_size"]),
    ):
        if field_name in task_config and int(task_config[field_name]) != found:
            raise ValueError(
                f"`config.yaml` of {folder} says {field_name}={task_config[field_name]} but the weights have {found}."
            )


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
    if "temp" in state_dict and not state_dict["temp"].is_meta:  # (a key listing on meta tensors has no value)
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


@dataclass
class _Context:
    """What the key table's conditional rows depend on."""

    config: MPLUGConfig
    task: str
    prefix: str
    fusion_start: int

    @property
    def vision_only(self) -> bool:
        return self.task == "caption"


@dataclass(frozen=True)
class _Rule:
    """A row of the key table. An original key (normalised) matching `pattern` goes to `target` (an `re` template;
    `{prefix}` is the trunk's prefix), to the keys of `split` (the tensor cut in as many chunks along dim 0), or is
    dropped for the reason `drop`; `target` may be a function `(match, context) -> (key | None, drop reason | None)`.
    `when` restricts the row; `value` transforms the tensor. The first matching row wins; a key no row matches is
    unmapped (and refused by the loaders)."""

    pattern: str
    target: str | Callable[[re.Match, _Context], tuple[str | None, str | None]] | None = None
    drop: str | None = None
    split: tuple[str, ...] = ()
    when: Callable[[_Context], bool] | None = None
    value: Callable[[torch.Tensor, _Context], torch.Tensor] | None = None


def _resized_position_embedding(value: torch.Tensor, context: _Context) -> torch.Tensor:
    vision = context.config.vision_config
    return resize_position_embedding(value, vision.image_size // vision.patch_size)


def _fusion_layer(match: re.Match, context: _Context) -> tuple[str | None, str | None]:
    """Original fusion layer `i` -> cross-modal layer `i - start` (the original builds layers it never runs)."""
    index, name = int(match.group(1)), match.group(2)
    if index < context.fusion_start:
        return None, "fusion layers built but never run"
    j = index - context.fusion_start
    if context.config.cross_modal_layer_types[j] == CONNECTED_ATTENTION and name.startswith("crossattention."):
        return None, "cross-attention of connected-attention layers (unused)"
    return f"{context.prefix}cross_modal_encoder.layer.{j}.{name}", None


_V = r"^visual_encoder\.visual\."
_BLOCK = _V + r"transformer\.resblocks\.(\d+)\."
_LAYERS = "{prefix}vision_model.encoder.layers.\\1."
_TRAINING_ONLY = "training-only state (momentum copies, queues)"
_REBUILT = "buffers rebuilt by transformers"
_DECODER_TASKS = ("vqa", "caption", "grounding", "pretrained")
_RETRIEVAL_TASKS = ("retrieval", "pretrained")

# the trunk: CLIP vision tower (+ projection), BERT text encoder, the run fusion layers
_TRUNK_RULES = (
    _Rule(r"^(image_queue|text_queue|idx_queue|queue_ptr|video_queue)$", drop=_TRAINING_ONLY),
    _Rule(r"^[a-z_]+_m\.", drop=_TRAINING_ONLY),
    _Rule(_V + r"proj$", drop="CLIP projection (unused)"),
    _Rule(
        _V + r"positional_embedding$",
        "{prefix}vision_model.embeddings.position_embedding.weight",
        value=_resized_position_embedding,
    ),
    _Rule(_V + r"class_embedding$", "{prefix}vision_model.embeddings.class_embedding"),
    _Rule(_V + r"conv1\.weight$", "{prefix}vision_model.embeddings.patch_embedding.weight"),
    _Rule(_V + r"ln_pre\.(weight|bias)$", "{prefix}vision_model.pre_layrnorm.\\1"),
    _Rule(_V + r"ln_post\.(weight|bias)$", "{prefix}vision_model.post_layernorm.\\1"),
    _Rule(
        _BLOCK + r"attn\.in_proj_(weight|bias)$",
        split=tuple(f"{_LAYERS}self_attn.{p}.\\2" for p in ("q_proj", "k_proj", "v_proj")),
    ),
    _Rule(_BLOCK + r"attn\.out_proj\.(.+)$", _LAYERS + "self_attn.out_proj.\\2"),
    _Rule(_BLOCK + r"ln_1\.(.+)$", _LAYERS + "layer_norm1.\\2"),
    _Rule(_BLOCK + r"ln_2\.(.+)$", _LAYERS + "layer_norm2.\\2"),
    _Rule(_BLOCK + r"mlp\.c_fc\.(.+)$", _LAYERS + "mlp.fc1.\\2"),
    _Rule(_BLOCK + r"mlp\.c_proj\.(.+)$", _LAYERS + "mlp.fc2.\\2"),
    _Rule(r"^visual_encoder\.(?!visual\.)", drop="CLIP text tower (unused)"),
    _Rule(r"^visn_fc\.(.+)$", "{prefix}vision_projection.dense.\\1", when=lambda c: c.config.has_vision_projection),
    _Rule(
        r"^visn_layer_norm\.(.+)$",
        "{prefix}vision_projection.layer_norm.\\1",
        when=lambda c: c.config.has_vision_projection,
    ),
    _Rule(
        r"^(text_encoder|fusion_encoder)\.",
        drop="text encoder / fusion (never run by the captioner)",
        when=lambda c: c.vision_only,
    ),
    _Rule(r"^text_encoder\.(.*\.)?embeddings\.position_ids$", drop=_REBUILT),
    _Rule(r"^text_encoder\.pooler\.", drop="text-encoder pooler (unused)"),
    _Rule(r"^text_encoder\.((?:embeddings|encoder\.layer)\..+)$", "{prefix}text_model.\\1"),
    _Rule(r"^fusion_encoder\.encoder\.layer\.(\d+)\.(.+)$", _fusion_layer),
    _Rule(r"^fusion_encoder\.(embeddings|pooler)\.", drop="fusion embeddings/pooler (never run)"),
)
# the task heads around the trunk
_TASK_RULES = (
    _Rule(
        r"^(?:text_encoder|fusion_encoder)\.cls\.predictions\.(.+)$",
        "mlm_head.predictions.\\1",
        when=lambda c: c.task == "pretrained",
    ),
    _Rule(r"^temp$", "temp", when=lambda c: c.task in _RETRIEVAL_TASKS, value=lambda v, c: v.reshape(1)),
    _Rule(r"^((?:vision_proj|text_proj|itm_head)\..+)$", "\\1", when=lambda c: c.task in _RETRIEVAL_TASKS),
    _Rule(r"^(temp$|vision_proj\.|text_proj\.|itm_head\.)", drop="retrieval projections (unused by this task)"),
    _Rule(
        r"^(prefix_ids|target_ids|bbox_prob_mask)$",
        drop="grounding token buffers (rebuilt from the config)",
        when=lambda c: c.task == "grounding",
    ),
    _Rule(r"^text_decoder\.(.*\.)?embeddings\.position_ids$", drop=_REBUILT, when=lambda c: c.task in _DECODER_TASKS),
    _Rule(
        r"^text_decoder\.((?:bert\.embeddings|bert\.encoder\.layer|cls\.predictions)\..+)$",
        "text_decoder.\\1",
        when=lambda c: c.task in _DECODER_TASKS,
    ),
)


def _fusion_start(state_dict: Mapping[str, torch.Tensor], config: MPLUGConfig) -> int:
    """The first original fusion layer that runs: the original builds `fusion_layers` layers and runs the last ones."""
    schedule = config.cross_modal_layer_types
    fusion_keys = [k for k in map(normalise_original_key, state_dict) if k.startswith("fusion_encoder.encoder.layer.")]
    built = 1 + max((int(k.split(".")[3]) for k in fusion_keys), default=len(schedule) - 1)
    if built < len(schedule):
        raise ValueError(
            f"The checkpoint has {built} fusion layers but the config runs {len(schedule)} "
            "(`cross_modal_layer_types`); check `fusion_layers` in the BERT config."
        )
    return built - len(schedule)


def _apply_rules(
    state_dict: Mapping[str, torch.Tensor], rules: tuple[_Rule, ...], context: _Context
) -> OriginalKeyMapping:
    result = OriginalKeyMapping(state_dict={})
    compiled = [(rule, re.compile(rule.pattern)) for rule in rules]
    for raw_key, value in state_dict.items():
        key = normalise_original_key(raw_key)
        for rule, regex in compiled:
            match = regex.match(key)
            if match is None or (rule.when is not None and not rule.when(context)):
                continue
            if rule.drop is not None:
                result.drop(rule.drop, raw_key)
            elif rule.split:
                for template, chunk in zip(rule.split, value.chunk(len(rule.split), dim=0)):
                    result.state_dict[match.expand(template.format(prefix=context.prefix))] = chunk.clone()
            else:
                if callable(rule.target):
                    target, reason = rule.target(match, context)
                else:
                    target, reason = match.expand(rule.target.format(prefix=context.prefix)), None
                if reason is not None:
                    result.drop(reason, raw_key)
                else:
                    result.state_dict[target] = value if rule.value is None else rule.value(value, context)
            break
        else:
            result.unmapped.append(raw_key)
    return result


def map_original_trunk_state_dict(
    state_dict: Mapping[str, torch.Tensor], config: MPLUGConfig, prefix: str = "", vision_only: bool = False
) -> OriginalKeyMapping:
    """Map the trunk part of an original mPLUG state dict onto [`MPLUGModel`] keys (with `prefix` in front), by the
    key table `_TRUNK_RULES`.

    Keys outside the trunk (decoder, heads) are returned in `unmapped` for the caller to place or reject; dead and
    training-only weights are listed in `dropped` by reason. With `vision_only` (the captioner), the text encoder
    and the fusion, which the original captioner never runs, are dropped.
    """
    context = _Context(config, "caption" if vision_only else "trunk", prefix, _fusion_start(state_dict, config))
    return _apply_rules(state_dict, _TRUNK_RULES, context)


TASKS = ("trunk", "vqa", "caption", "retrieval", "grounding", "pretrained")
# momentum-encoder parameters of MPLUGForPreTraining and the student weights they start from
_TEACHER_SOURCES = {
    "momentum_encoder.vision_model.": "mplug.vision_model.",
    "momentum_encoder.vision_projection.": "mplug.vision_projection.",
    "momentum_encoder.text_model.": "mplug.text_model.",
    "momentum_encoder.vision_proj.": "vision_proj.",
    "momentum_encoder.text_proj.": "text_proj.",
}


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
    context = _Context(config, task, "mplug.", _fusion_start(state_dict, config))
    mapping = _apply_rules(state_dict, _TRUNK_RULES + _TASK_RULES, context)
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
    model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], task: str, assign: bool = False
) -> OriginalKeyMapping:
    """Map an original state dict for `task` (see [`map_original_state_dict`]) and load it strictly into `model`.

    With `assign=True` the model (typically built on the meta device) takes the checkpoint's tensors themselves
    (no copy: with a memory-mapped checkpoint only the weights it keeps are ever read); see [`check_and_load`]."""
    mapping = map_original_state_dict(state_dict, model.config, task)
    if mapping.unmapped:
        raise ValueError(
            f"{len(mapping.unmapped)} original key(s) cannot be placed in {type(model).__name__}: {mapping.unmapped}"
        )
    check_and_load(model, mapping.state_dict, assign=assign)
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


def check_and_load(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], assign: bool = False) -> None:
    """Strict load with shape checks and errors that name every missing/unexpected/mis-shaped key.

    `assign=True` makes the given tensors the model's parameters (cast where the dtype differs) instead of copying
    them; the buffers the checkpoint does not hold (position ids) are then built, and the tied weights tied again."""
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
    model.load_state_dict(cast, strict=True, assign=assign)
    if assign:
        _build_meta_buffers(model)
        if hasattr(model, "tie_weights"):
            model.tie_weights()


def _build_meta_buffers(model: torch.nn.Module) -> None:
    """The non-persistent buffers of a model built on the meta device: BERT's and CLIP's position ids (an
    arange) and BERT's token type ids (zeros). Any other buffer left on meta is an error."""
    for name, module in model.named_modules():
        for buffer_name, buffer in list(module._buffers.items()):
            if buffer is None or not buffer.is_meta:
                continue
            if buffer_name == "position_ids":
                value = torch.arange(buffer.shape[-1], dtype=buffer.dtype).expand(buffer.shape).clone()
            elif buffer_name == "token_type_ids":
                value = torch.zeros(buffer.shape, dtype=buffer.dtype)
            else:
                raise ValueError(f"The buffer {name}.{buffer_name} is not in the checkpoint and cannot be rebuilt.")
            module._buffers[buffer_name] = value


__all__ = [
    "OriginalKeyMapping",
    "ModelScopeFolder",
    "MODELSCOPE_TASKS",
    "MODELSCOPE_TEXT_KWARGS",
    "is_modelscope_folder",
    "read_modelscope_folder",
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
