"""mPLUG model configuration."""

from __future__ import annotations

import contextvars
import copy
import functools
from typing import Any

from transformers import BertConfig, CLIPVisionConfig, GenerationConfig, PretrainedConfig
from transformers.utils import logging

logger = logging.get_logger(__name__)

CO_ATTENTION = "co_attention"
CONNECTED_ATTENTION = "connected_attention"
CROSS_MODAL_LAYER_TYPES = (CO_ATTENTION, CONNECTED_ATTENTION)
# the pretraining objectives and their default weights
PRETRAINING_LOSSES = {"itc": 1.0, "itm": 1.0, "mlm": 1.0, "prefix_lm": 1.0}

# Keys every `PretrainedConfig` serialises or accepts on top of a model's own arguments.
_COMMON_KEYS = (
    frozenset(PretrainedConfig().to_dict())
    | frozenset(
        GenerationConfig._get_default_generation_params()
        if hasattr(GenerationConfig, "_get_default_generation_params")
        else ()
    )
    | {
        "model_type",
        "transformers_version",
        "architectures",
        "auto_map",
        "torch_dtype",
        "dtype",
        "name_or_path",
        "_name_or_path",
        "_commit_hash",
        "attn_implementation",
        "experts_implementation",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "num_labels",
        "id2label",
        "label2id",
        "problem_type",
        "tie_word_embeddings",
        "chunk_size_feed_forward",
        "is_encoder_decoder",
        "use_cache",
    }
)

# set while a saved config is read (`from_dict`): unknown keys then warn instead of failing
_LOADING: contextvars.ContextVar[bool] = contextvars.ContextVar("mplug_config_loading", default=False)


@functools.cache
def _sub_config_keys(cls: type) -> frozenset[str]:
    """Fields a sub-config class accepts: its serialised keys, its constructor arguments, the common ones."""
    import inspect

    parameters = set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"}
    return frozenset(cls().to_dict()) | parameters | _COMMON_KEYS


_BASE_VISION = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "image_size": 384,
    "patch_size": 16,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "attention_dropout": 0.1,
}
_LARGE_VISION = {
    **_BASE_VISION,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 336,
    "patch_size": 14,
}
_BERT_BASE = {
    "vocab_size": 30522,
    "hidden_size": 768,
    "num_hidden_layers": 6,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
    "layer_norm_eps": 1e-12,
    "pad_token_id": 0,
}

PRESETS: dict[str, dict[str, Any]] = {
    # mPLUG-base: CLIP ViT-B/16 at 384 px, connected attention at fusion layer 3 of 6 (stride 3).
    "base": {"vision_config": _BASE_VISION, "text_config": _BERT_BASE, "connected_attention_stride": 3},
    # mPLUG-large: CLIP ViT-L/14 at 336 px, projection 1024 -> 768, six co-attention layers (stride 6).
    "large": {"vision_config": _LARGE_VISION, "text_config": _BERT_BASE, "connected_attention_stride": 6},
}


def cross_modal_schedule(num_layers: int, stride: int) -> list[str]:
    """The original mPLUG fusion schedule: layer `j` is connected attention iff `j != 0 and j % stride == 0`.

    Example:
        >>> cross_modal_schedule(6, 3)
        ['co_attention', 'co_attention', 'co_attention', 'connected_attention', 'co_attention', 'co_attention']
    """
    if not isinstance(num_layers, int) or isinstance(num_layers, bool) or num_layers < 1:
        raise ValueError(f"`num_cross_modal_layers` must be a positive int, got {num_layers!r}.")
    if not isinstance(stride, int) or isinstance(stride, bool) or stride < 1:
        raise ValueError(f"`connected_attention_stride` must be a positive int, got {stride!r}.")
    return [CONNECTED_ATTENTION if j != 0 and j % stride == 0 else CO_ATTENTION for j in range(num_layers)]


class MPLUGConfig(PretrainedConfig):
    r"""
    Configuration of an mPLUG model: a CLIP vision tower, a BERT text encoder, a skip-connected cross-modal
    encoder and a BERT decoder. The defaults give mPLUG-base; `MPLUGConfig.from_preset("large")` gives mPLUG-large.

    Args:
        vision_config (`dict` or `CLIPVisionConfig`, *optional*):
            The CLIP vision tower (its `image_size` is the model's input resolution).
        text_config (`dict` or `BertConfig`, *optional*):
            The BERT sizes shared by the text encoder, the cross-modal encoder and the decoder.
            `text_config.num_hidden_layers` is the depth of the text encoder.
        cross_modal_layer_types (`list[str]`, *optional*):
            The explicit per-layer schedule of the cross-modal encoder, each entry `"co_attention"` or
            `"connected_attention"`. Derived from `num_cross_modal_layers` and `connected_attention_stride` when not
            given.
        num_cross_modal_layers (`int`, *optional*, defaults to 6):
            Depth of the cross-modal encoder when the schedule is derived.
        connected_attention_stride (`int`, *optional*, defaults to 3):
            The original's `stride_layer` (S): layer `j` is connected attention iff `j != 0 and j % S == 0`.
        num_decoder_layers (`int`, *optional*, defaults to 12):
            Depth of the answer/caption decoder used by the task heads (`text_decoder_config.num_hidden_layers`).
        text_decoder_config (`dict` or `BertConfig`, *optional*):
            The decoder's sub-config (the config object of the heads' `text_decoder`): built from `text_config`,
            `num_decoder_layers` deep, with cross-attention. A given one (a saved `config.json`) must agree with
            them.
        image_size (`int`, *optional*):
            Shortcut that overrides `vision_config.image_size`.
        vision_projection_dropout (`float`, *optional*, defaults to 0.1):
            Dropout after the vision -> text projection (only present when the widths differ).
        initializer_range (`float`, *optional*, defaults to 0.02):
            Std of the normal initialiser of the weights that are not CLIP's.
        projection_dim (`int`, *optional*, defaults to 256):
            Width of the image-text contrastive (ITC) features of the retrieval head.
        itc_temperature (`float`, *optional*, defaults to 0.07):
            Initial value of the learnable ITC temperature.
        grounding_prefix_token_id (`int`, *optional*, defaults to 344):
            The token (`[unused339]`) the grounding decoder starts from after nothing else.
        coordinate_token_start_id (`int`, *optional*, defaults to 345):
            Id of coordinate bin 0 (`[unused340]`); bins are consecutive ids.
        num_coordinate_bins (`int`, *optional*, defaults to 337):
            Number of coordinate bins (a coordinate `v` in [0, 1] becomes bin `floor(v * (bins - 1))`).
        grounding_loss_weighting (`str`, *optional*, defaults to `"original"`):
            `"original"`: the original's batch-broadcast L1/GIoU weighting (parity); `"per_box"`: each box's own.
        queue_size (`int`, *optional*, defaults to 65536):
            Pretraining: number of momentum ITC features kept as extra negatives (0 disables the queue).
        momentum (`float`, *optional*, defaults to 0.995):
            Pretraining: EMA coefficient of the momentum (teacher) encoders, applied by
            [`MPLUGMomentumCallback`] after each optimizer step.
        distillation_alpha (`float`, *optional*, defaults to 0.4):
            Pretraining: weight of the momentum model's soft ITC targets (0 disables distillation).
        pretraining_loss_weights (`dict[str, float]`, *optional*):
            Pretraining: weights of the `"itc"`, `"itm"`, `"mlm"` and `"prefix_lm"` losses (each 1.0 by default;
            0 skips a loss).
        pad_token_id, bos_token_id, eos_token_id (`int`, *optional*):
            `[PAD]` (0), `[CLS]` (101, decoding starts here) and `[SEP]` (102, decoding stops here).

    Example:
        >>> from transformers_mplug import MPLUGConfig
        >>> config = MPLUGConfig()
        >>> config.cross_modal_layer_types[3]
        'connected_attention'
        >>> MPLUGConfig.from_preset("large").vision_config.image_size
        336
    """

    model_type = "mplug"
    sub_configs = {"vision_config": CLIPVisionConfig, "text_config": BertConfig, "text_decoder_config": BertConfig}
    # the decoder shares these sizes with the text encoder (the tied word embeddings, the memory's width)
    _DECODER_SHARED_FIELDS = (
        "vocab_size",
        "hidden_size",
        "num_attention_heads",
        "intermediate_size",
        "max_position_embeddings",
        "type_vocab_size",
        "hidden_act",
        "layer_norm_eps",
        "pad_token_id",
    )

    def __init__(
        self,
        vision_config: dict | CLIPVisionConfig | None = None,
        text_config: dict | BertConfig | None = None,
        cross_modal_layer_types: list[str] | None = None,
        num_cross_modal_layers: int | None = None,
        connected_attention_stride: int | None = None,
        num_decoder_layers: int = 12,
        text_decoder_config: dict | BertConfig | None = None,
        image_size: int | None = None,
        vision_projection_dropout: float = 0.1,
        initializer_range: float = 0.02,
        projection_dim: int = 256,
        itc_temperature: float = 0.07,
        grounding_prefix_token_id: int = 344,
        coordinate_token_start_id: int = 345,
        num_coordinate_bins: int = 337,
        grounding_loss_weighting: str = "original",
        queue_size: int = 65536,
        momentum: float = 0.995,
        distillation_alpha: float = 0.4,
        pretraining_loss_weights: dict[str, float] | None = None,
        pad_token_id: int = 0,
        bos_token_id: int = 101,
        eos_token_id: int = 102,
        **kwargs: Any,
    ) -> None:
        unknown = sorted(set(kwargs) - _COMMON_KEYS)
        if unknown:
            if not _LOADING.get():
                raise ValueError(
                    f"MPLUGConfig got unknown argument(s) {unknown}; check the spelling against the documented "
                    "arguments (vision_config, text_config, cross_modal_layer_types, num_cross_modal_layers, "
                    "connected_attention_stride, num_decoder_layers, image_size, ...)."
                )
            # a saved config.json (e.g. written by a newer release): keep the keys, so that the folder still loads
            logger.warning(
                "The saved MPLUGConfig has key(s) %s that this version of transformers-mplug does not know; they are "
                "kept as attributes but have no effect.",
                unknown,
            )
        self.vision_config = self._build_sub_config("vision_config", vision_config, CLIPVisionConfig, _BASE_VISION)
        self.text_config = self._build_sub_config("text_config", text_config, BertConfig, _BERT_BASE)
        if image_size is not None:
            if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size <= 0:
                raise ValueError(f"`image_size` must be a positive int, got {image_size!r}.")
            self.vision_config.image_size = image_size

        if cross_modal_layer_types is None:
            cross_modal_layer_types = cross_modal_schedule(
                6 if num_cross_modal_layers is None else num_cross_modal_layers,
                3 if connected_attention_stride is None else connected_attention_stride,
            )
        else:
            if not isinstance(cross_modal_layer_types, (list, tuple)) or not cross_modal_layer_types:
                raise ValueError(
                    "`cross_modal_layer_types` must be a non-empty list of 'co_attention' / 'connected_attention', "
                    f"got {cross_modal_layer_types!r}."
                )
            cross_modal_layer_types = list(cross_modal_layer_types)
            bad = [t for t in cross_modal_layer_types if t not in CROSS_MODAL_LAYER_TYPES]
            if bad:
                raise ValueError(
                    f"`cross_modal_layer_types` entries must be one of {CROSS_MODAL_LAYER_TYPES}, got {bad}."
                )
            if num_cross_modal_layers is not None and num_cross_modal_layers != len(cross_modal_layer_types):
                raise ValueError(
                    f"`num_cross_modal_layers`={num_cross_modal_layers} disagrees with the "
                    f"{len(cross_modal_layer_types)} entries of `cross_modal_layer_types`; pass only one of them."
                )
            if connected_attention_stride is not None and cross_modal_layer_types != cross_modal_schedule(
                len(cross_modal_layer_types), connected_attention_stride
            ):
                raise ValueError(
                    f"`connected_attention_stride`={connected_attention_stride} disagrees with the explicit "
                    "`cross_modal_layer_types`; pass only one of them."
                )
        self.cross_modal_layer_types = cross_modal_layer_types

        if not isinstance(num_decoder_layers, int) or isinstance(num_decoder_layers, bool) or num_decoder_layers < 1:
            raise ValueError(f"`num_decoder_layers` must be a positive int, got {num_decoder_layers!r}.")
        self.text_decoder_config = self._build_decoder_config(text_decoder_config, num_decoder_layers)
        if not 0.0 <= float(vision_projection_dropout) < 1.0:
            raise ValueError(f"`vision_projection_dropout` must be in [0, 1), got {vision_projection_dropout!r}.")
        self.vision_projection_dropout = float(vision_projection_dropout)
        self.initializer_range = float(initializer_range)
        if not isinstance(projection_dim, int) or isinstance(projection_dim, bool) or projection_dim < 1:
            raise ValueError(f"`projection_dim` must be a positive int, got {projection_dim!r}.")
        if not 0.0 < float(itc_temperature) <= 1.0:
            raise ValueError(f"`itc_temperature` must be in (0, 1], got {itc_temperature!r}.")
        if not isinstance(num_coordinate_bins, int) or num_coordinate_bins < 2:
            raise ValueError(f"`num_coordinate_bins` must be an int >= 2, got {num_coordinate_bins!r}.")
        self.projection_dim = projection_dim
        self.itc_temperature = float(itc_temperature)
        self.grounding_prefix_token_id = grounding_prefix_token_id
        self.coordinate_token_start_id = coordinate_token_start_id
        self.num_coordinate_bins = num_coordinate_bins
        if grounding_loss_weighting not in ("original", "per_box"):
            raise ValueError(
                f"`grounding_loss_weighting` must be 'original' or 'per_box', got {grounding_loss_weighting!r}."
            )
        self.grounding_loss_weighting = grounding_loss_weighting
        if not isinstance(queue_size, int) or isinstance(queue_size, bool) or queue_size < 0:
            raise ValueError(f"`queue_size` must be an int >= 0, got {queue_size!r}.")
        if not 0.0 <= float(momentum) < 1.0:
            raise ValueError(f"`momentum` must be in [0, 1), got {momentum!r}.")
        if not 0.0 <= float(distillation_alpha) <= 1.0:
            raise ValueError(f"`distillation_alpha` must be in [0, 1], got {distillation_alpha!r}.")
        self.queue_size = queue_size
        self.momentum = float(momentum)
        self.distillation_alpha = float(distillation_alpha)
        weights = dict(PRETRAINING_LOSSES)
        if pretraining_loss_weights is not None:
            if not isinstance(pretraining_loss_weights, dict):
                raise TypeError(
                    f"`pretraining_loss_weights` must be a dict like {dict(PRETRAINING_LOSSES)}, "
                    f"got {type(pretraining_loss_weights).__name__}."
                )
            unknown_losses = sorted(set(pretraining_loss_weights) - set(PRETRAINING_LOSSES))
            if unknown_losses:
                raise ValueError(
                    f"`pretraining_loss_weights` has unknown loss(es) {unknown_losses}; use {list(PRETRAINING_LOSSES)}."
                )
            for name, value in pretraining_loss_weights.items():
                if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                    raise ValueError(f"`pretraining_loss_weights[{name!r}]` must be a number >= 0, got {value!r}.")
                weights[name] = float(value)
        if not any(weights.values()):
            raise ValueError("`pretraining_loss_weights` turns every loss off; keep at least one weight > 0.")
        self.pretraining_loss_weights = weights

        text = self.text_config
        if text.num_hidden_layers < 1:
            raise ValueError(
                f"`text_config.num_hidden_layers` (the text-encoder depth) must be >= 1, got {text.num_hidden_layers}."
            )
        if text.hidden_size % text.num_attention_heads != 0:
            raise ValueError(
                f"`text_config.hidden_size` ({text.hidden_size}) must be a multiple of "
                f"`text_config.num_attention_heads` ({text.num_attention_heads})."
            )
        vision = self.vision_config
        if vision.hidden_size % vision.num_attention_heads != 0:
            raise ValueError(
                f"`vision_config.hidden_size` ({vision.hidden_size}) must be a multiple of "
                f"`vision_config.num_attention_heads` ({vision.num_attention_heads})."
            )
        if vision.image_size % vision.patch_size != 0:
            raise ValueError(
                f"`vision_config.image_size` ({vision.image_size}) must be a multiple of "
                f"`vision_config.patch_size` ({vision.patch_size})."
            )
        for name, value in (
            ("pad_token_id", pad_token_id),
            ("bos_token_id", bos_token_id),
            ("eos_token_id", eos_token_id),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < text.vocab_size:
                raise ValueError(
                    f"`{name}` must be an int in [0, text_config.vocab_size={text.vocab_size}), got {value!r}."
                )
        self.pad_token_id = pad_token_id
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        kwargs.setdefault("tie_word_embeddings", True)
        super().__init__(**kwargs)

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any):
        """As `PretrainedConfig.from_dict`; keys this version does not know (a config written by a newer release)
        load with a warning instead of the error that a misspelt constructor argument gets."""
        token = _LOADING.set(True)
        try:
            return super().from_dict(config_dict, **kwargs)
        finally:
            _LOADING.reset(token)

    @staticmethod
    def _build_sub_config(name: str, value: Any, cls: type, defaults: dict[str, Any]) -> PretrainedConfig:
        """A sub-config from mPLUG's own defaults (the base preset), overridden by the given fields; a dict key that
        the sub-config class does not know is a typo (an error), or, in a saved config, a warning."""
        if value is None:
            return cls(**defaults)
        if isinstance(value, cls):
            return copy.deepcopy(value)
        if isinstance(value, dict):
            value = {k: v for k, v in value.items() if k not in ("model_type", "transformers_version")}
            unknown = sorted(set(value) - _sub_config_keys(cls))
            if unknown:
                if not _LOADING.get():
                    raise ValueError(
                        f"`{name}` has unknown field(s) {unknown}; check the spelling against {cls.__name__}'s "
                        "arguments."
                    )
                logger.warning("The saved `%s` has key(s) %s that %s does not know.", name, unknown, cls.__name__)
            return cls(**{**defaults, **value})
        raise TypeError(f"`{name}` must be a dict or a {cls.__name__}, got {type(value).__name__}.")

    @classmethod
    def from_preset(cls, name: str, **kwargs: Any) -> MPLUGConfig:
        """The configuration of a released mPLUG model: `"base"` or `"large"`; `kwargs` override fields.

        Example:
            >>> MPLUGConfig.from_preset("large").cross_modal_layer_types.count("connected_attention")
            0
        """
        if name not in PRESETS:
            raise ValueError(f"Unknown preset {name!r}; choose one of {sorted(PRESETS)}.")
        args = copy.deepcopy(PRESETS[name])
        if "cross_modal_layer_types" in kwargs or "connected_attention_stride" in kwargs:
            args.pop("connected_attention_stride")
        args.update(kwargs)
        return cls(**args)

    @property
    def image_size(self) -> int:
        """Input resolution (the vision tower's `image_size`)."""
        return self.vision_config.image_size

    @property
    def hidden_size(self) -> int:
        """Width of the text encoder, the cross-modal encoder and the decoder."""
        return self.text_config.hidden_size

    @property
    def vocab_size(self) -> int:
        """The text vocabulary (`text_config.vocab_size`), shared by the text encoder and the decoder."""
        return self.text_config.vocab_size

    @vocab_size.setter
    def vocab_size(self, value: int) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"`vocab_size` must be an int >= 1, got {value!r}.")
        self.text_config.vocab_size = value
        self.text_decoder_config.vocab_size = value

    @property
    def has_vision_projection(self) -> bool:
        """Whether image features are projected to the text width (the vision and text widths differ)."""
        return self.vision_config.hidden_size != self.text_config.hidden_size

    @property
    def num_image_tokens(self) -> int:
        """Tokens per image (patches + class token)."""
        return (self.vision_config.image_size // self.vision_config.patch_size) ** 2 + 1

    def _build_decoder_config(self, value: dict | BertConfig | None, num_layers: int) -> BertConfig:
        derived = copy.deepcopy(self.text_config)
        derived.num_hidden_layers = num_layers
        derived.is_decoder = True
        derived.add_cross_attention = True
        derived.tie_word_embeddings = True
        if value is None:
            return derived
        if isinstance(value, dict):
            config = self._build_sub_config("text_decoder_config", value, BertConfig, derived.to_dict())
        elif isinstance(value, BertConfig):
            config = copy.deepcopy(value)
        else:
            raise TypeError(f"`text_decoder_config` must be a dict or a BertConfig, got {type(value).__name__}.")
        for name in self._DECODER_SHARED_FIELDS:
            if getattr(config, name) != getattr(self.text_config, name):
                raise ValueError(
                    f"`text_decoder_config.{name}`={getattr(config, name)!r} disagrees with "
                    f"`text_config.{name}`={getattr(self.text_config, name)!r}: the decoder shares the text sizes."
                )
        if config.num_hidden_layers != num_layers:
            raise ValueError(
                f"`text_decoder_config.num_hidden_layers`={config.num_hidden_layers} disagrees with "
                f"`num_decoder_layers`={num_layers}; pass only one of them."
            )
        if not (config.is_decoder and config.add_cross_attention):
            raise ValueError("`text_decoder_config` must have `is_decoder=True` and `add_cross_attention=True`.")
        return config

    @property
    def num_decoder_layers(self) -> int:
        """Depth of the task decoder (`text_decoder_config.num_hidden_layers`)."""
        return self.text_decoder_config.num_hidden_layers

    @num_decoder_layers.setter
    def num_decoder_layers(self, value: int) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"`num_decoder_layers` must be a positive int, got {value!r}.")
        self.text_decoder_config.num_hidden_layers = value

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        output["num_decoder_layers"] = self.num_decoder_layers
        return output

    def decoder_config(self) -> BertConfig:
        """The BERT config of the task decoder, `text_decoder_config` (the heads' `text_decoder.config` is this
        object): the text sizes, `num_decoder_layers` deep, with cross-attention."""
        return self.text_decoder_config


__all__ = ["MPLUGConfig", "cross_modal_schedule", "CO_ATTENTION", "CONNECTED_ATTENTION"]
