"""PyTorch mPLUG trunk: CLIP vision tower, BERT text encoder and the skip-connected cross-modal encoder."""

from __future__ import annotations

import copy
import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import (
    BertConfig,
    BertLMHeadModel,
    BertModel,
    CLIPVisionConfig,
    GenerationConfig,
    GenerationMixin,
    PreTrainedModel,
)
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache, EncoderDecoderCache
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.bert.modeling_bert import (
    BertAttention,
    BertCrossAttention,
    BertEmbeddings,
    BertIntermediate,
    BertOnlyMLMHead,
    BertOutput,
    BertSelfAttention,
    eager_attention_forward,
)
from transformers.models.clip.modeling_clip import CLIPAttention, CLIPEncoder, CLIPEncoderLayer, CLIPVisionEmbeddings
from transformers.processing_utils import Unpack
from transformers.utils import ModelOutput, TransformersKwargs, can_return_tuple, logging
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_mplug import CO_ATTENTION, MPLUGConfig
from .generation_mplug import ORIGINAL, original_beam_search, resolve_decoding_mode, validate_decoding
from .image_processing_mplug import boxes_to_coordinate_tokens, coordinate_tokens_to_boxes

logger = logging.get_logger(__name__)

# transformers <= 5.23 calls the KV cache `past_key_values`, newer releases `cache`
_CACHE_ARGUMENT = "cache" if "cache" in inspect.signature(BertLMHeadModel.forward).parameters else "past_key_values"


@dataclass
class MPLUGModelOutput(ModelOutput):
    r"""
    Output of [`MPLUGModel`].

    Args:
        last_hidden_state (`torch.FloatTensor` of shape `(batch_size, num_image_tokens + text_length, hidden_size)`):
            The fused memory `concat(V', T')` that the question-answering and grounding decoders attend to.
        memory_attention_mask (`torch.LongTensor` of shape `(batch_size, num_image_tokens + text_length)`):
            Its mask: `concat(ones, attention_mask)`.
        fused_image_embeds (`torch.FloatTensor` of shape `(batch_size, num_image_tokens, hidden_size)`):
            Image states after the cross-modal encoder (V').
        fused_text_embeds (`torch.FloatTensor` of shape `(batch_size, text_length, hidden_size)`):
            Text states after the cross-modal encoder (T').
        image_embeds (`torch.FloatTensor` of shape `(batch_size, num_image_tokens, hidden_size)`):
            Image features entering the cross-modal encoder (V: vision tower output, projected when the widths differ).
        text_embeds (`torch.FloatTensor` of shape `(batch_size, text_length, hidden_size)`):
            Text-encoder output (T).
        vision_last_hidden_state (`torch.FloatTensor` of shape `(batch_size, num_image_tokens, vision_hidden_size)`, *optional*):
            The vision tower's output (post-layernorm on every token) before the projection; `None` when
            `image_embeds` were passed in.
        vision_hidden_states, text_hidden_states (`tuple(torch.FloatTensor)`, *optional*, with `output_hidden_states=True`):
            The vision tower's (the input of its first layer, then each layer's output, before `post_layernorm`, as
            CLIP's; frames of a video are rows) and the text encoder's (embeddings, then each layer) hidden states.
        fusion_image_hidden_states, fusion_text_hidden_states (`tuple(torch.FloatTensor)`, *optional*, with `output_hidden_states=True`):
            The image and text states after each cross-modal layer (their inputs are `image_embeds`/`text_embeds`).
        vision_attentions, text_attentions, fusion_attentions (`tuple(torch.FloatTensor)`, *optional*, with `output_attentions=True`):
            Self-attention weights `(batch, heads, queries, keys)` of each layer of the vision tower, the text encoder
            and the cross-modal encoder (over `[V; T]` in connected-attention layers). Attention weights exist with
            `attn_implementation="eager"`; other kernels do not compute them (the tuples are then empty).
        fusion_cross_attentions (`tuple(torch.FloatTensor)`, *optional*, with `output_attentions=True`):
            Text-to-image cross-attention weights of each co-attention layer.
    """

    last_hidden_state: torch.FloatTensor | None = None
    memory_attention_mask: torch.LongTensor | None = None
    fused_image_embeds: torch.FloatTensor | None = None
    fused_text_embeds: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    vision_last_hidden_state: torch.FloatTensor | None = None
    vision_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    vision_attentions: tuple[torch.FloatTensor, ...] | None = None
    text_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    text_attentions: tuple[torch.FloatTensor, ...] | None = None
    fusion_image_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    fusion_text_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    fusion_attentions: tuple[torch.FloatTensor, ...] | None = None
    fusion_cross_attentions: tuple[torch.FloatTensor, ...] | None = None


# what the trunk records with transformers' output capturing (hooks on these modules), per `output_*` flag
_RECORDED_HIDDEN_STATES = ("vision_hidden_states", "fusion_image_hidden_states", "fusion_text_hidden_states")
_RECORDED_ATTENTIONS = ("vision_attentions", "fusion_attentions", "fusion_cross_attentions")
# the trunk's recorded fields that the heads' outputs carry as well
TRUNK_RECORDED_FIELDS = (
    "vision_hidden_states",
    "vision_attentions",
    "text_hidden_states",
    "text_attentions",
    "fusion_image_hidden_states",
    "fusion_text_hidden_states",
    "fusion_attentions",
    "fusion_cross_attentions",
)


def _recorded_fields(trunk_output: MPLUGModelOutput | None) -> dict:
    """The recorded hidden states/attentions of a trunk output, for a head's output."""
    if trunk_output is None:
        return {}
    fields = {name: getattr(trunk_output, name) for name in TRUNK_RECORDED_FIELDS}
    return {name: value for name, value in fields.items() if value is not None}


def _reject_unused_kwargs(model: nn.Module, kwargs: dict, ignored: tuple[str, ...] = ("token_type_ids",)) -> None:
    """`TransformersKwargs` that mPLUG does not use (packed-sequence and MoE arguments) must not be given: refuse
    them by name instead of ignoring them. `token_type_ids` (all zero in the original) are ignored."""
    for name in ignored:
        kwargs.pop(name, None)
    given = sorted(name for name, value in kwargs.items() if value is not None)
    if given:
        raise TypeError(f"{type(model).__name__}.forward() got unexpected keyword argument(s) {given}.")


def _output_flags(config: MPLUGConfig, output_hidden_states: bool | None, output_attentions: bool | None) -> tuple:
    hidden = config.output_hidden_states if output_hidden_states is None else output_hidden_states
    attentions = config.output_attentions if output_attentions is None else output_attentions
    for name, value in (("output_hidden_states", hidden), ("output_attentions", attentions)):
        if not isinstance(value, bool):
            raise TypeError(f"`{name}` must be True or False, got {value!r}.")
    return hidden, attentions


def _check_ids(ids: torch.Tensor, name: str, vocab_size: int, ignore_index: int | None = None) -> None:
    """Token ids must be integers in `[0, vocab_size)` (`ignore_index` entries of labels aside)."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor of token ids, got {type(ids).__name__}.")
    if ids.is_floating_point() or ids.dtype == torch.bool:
        raise TypeError(f"`{name}` must hold integer token ids, got dtype {ids.dtype}.")
    values = ids if ignore_index is None else ids[ids != ignore_index]
    if values.numel() and (int(values.min()) < 0 or int(values.max()) >= vocab_size):
        raise ValueError(
            f"`{name}` holds ids outside [0, {vocab_size}) (min {int(values.min())}, max {int(values.max())}): the "
            f"model's vocabulary has {vocab_size} tokens. Encode the text with this model's processor/tokenizer."
        )


def _text_attention_mask(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, pad_token_id: int, name: str = "input_ids"
) -> torch.Tensor:
    """The given mask (checked against the ids' shape), or one derived from the padding (`[PAD]` = 0)."""
    if attention_mask is None:
        return (input_ids != pad_token_id).long()
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask)
        raise ValueError(
            f"`attention_mask` has shape {shape}; it must equal the shape of `{name}` {tuple(input_ids.shape)}."
        )
    return attention_mask


class MPLUGVisionTransformer(nn.Module):
    """OpenAI CLIP ViT built from transformers' CLIP modules, with `post_layernorm` applied to every token.

    Held as a plain module so that the saved keys (`embeddings.*`, `pre_layrnorm.*`, `encoder.layers.*`,
    `post_layernorm.*`) stay the same on every transformers release.
    """

    def __init__(self, config: CLIPVisionConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = CLIPVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = CLIPEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        hidden_states = self.embeddings(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
        hidden_states = self.pre_layrnorm(hidden_states)
        hidden_states = self.encoder(inputs_embeds=hidden_states).last_hidden_state
        return self.post_layernorm(hidden_states)


class MPLUGVisionProjection(nn.Module):
    """Vision width -> text width (mPLUG-large): Linear, LayerNorm, dropout."""

    def __init__(self, config: MPLUGConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.vision_config.hidden_size, config.text_config.hidden_size)
        self.layer_norm = nn.LayerNorm(config.text_config.hidden_size, eps=config.text_config.layer_norm_eps)
        self.dropout = nn.Dropout(config.vision_projection_dropout)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.layer_norm(self.dense(hidden_states)))


class MPLUGCrossModalLayer(GradientCheckpointingLayer):
    """One layer of the skip-connected cross-modal encoder.

    - `co_attention`: `T <- LN(T + SelfAttn(T))`, `T <- LN(T + CrossAttn(T, V))`, `T <- LN(T + FFN(T))`; V unchanged.
    - `connected_attention`: `H = [V; T]`, `H <- LN(H + SelfAttn(H))`, `H <- LN(H + FFN(H))` with the layer's own
      self-attention weights; then `V <- V + H_V` (extra image residual) and `T <- H_T`. It has no cross-attention.
    """

    def __init__(self, config: BertConfig, layer_type: str, layer_idx: int) -> None:
        super().__init__()
        self.layer_type = layer_type
        self.attention = BertAttention(config, layer_idx=layer_idx)
        if layer_type == CO_ATTENTION:
            self.crossattention = BertAttention(config, layer_idx=layer_idx, is_cross_attention=True)
            # the same module with a grouped path: texts sharing an image attend to its keys/values in one call
            # (ITM re-ranking); a class swap, so that no parameter is created (the random init stays the same)
            self.crossattention.self.__class__ = MPLUGSharedMemoryCrossAttention
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def _feed_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.output(self.intermediate(hidden_states), hidden_states)

    def cross_attend(self, text_embeds: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        """The co-attention layer's cross-attention step: text queries over the image tokens (residual + LayerNorm)."""
        return self.crossattention(text_embeds, encoder_hidden_states=image_embeds, encoder_attention_mask=None)[0]

    def forward(
        self,
        image_embeds: torch.Tensor,
        text_embeds: torch.Tensor,
        text_mask: torch.Tensor | None,
        joint_mask: torch.Tensor | None,
        cross_attention: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`cross_attention` (co-attention layers only) replaces the layer's cross-attention step: it maps the
        self-attended text `(B, L, D)` to the cross-attended text (after the attention's residual and LayerNorm).
        [`MPLUGForVisualReasoning`] uses it to attend to two images and average the results."""
        if self.layer_type == CO_ATTENTION:
            text_embeds = self.attention(text_embeds, attention_mask=text_mask)[0]
            if cross_attention is None:
                text_embeds = self.cross_attend(text_embeds, image_embeds)
            else:
                text_embeds = cross_attention(text_embeds)
            return image_embeds, self._feed_forward(text_embeds)
        if cross_attention is not None:
            raise ValueError("`cross_attention` applies to co-attention layers; connected-attention layers have none.")
        num_image_tokens = image_embeds.shape[1]
        hidden_states = torch.cat([image_embeds, text_embeds], dim=1)
        hidden_states = self.attention(hidden_states, attention_mask=joint_mask)[0]
        hidden_states = self._feed_forward(hidden_states)
        return image_embeds + hidden_states[:, :num_image_tokens], hidden_states[:, num_image_tokens:]


class MPLUGCrossModalEncoder(nn.Module):
    """The skip-connected cross-modal encoder, one layer per entry of `config.cross_modal_layer_types`."""

    def __init__(self, config: MPLUGConfig) -> None:
        super().__init__()
        self.config = config.text_config
        self.layer = nn.ModuleList(
            [MPLUGCrossModalLayer(config.text_config, t, i) for i, t in enumerate(config.cross_modal_layer_types)]
        )

    def masks(
        self, image_embeds: torch.Tensor, text_embeds: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The text self-attention mask and, when a connected-attention layer exists, the mask over `[V; T]`."""
        text_mask = create_bidirectional_mask(
            config=self.config, inputs_embeds=text_embeds, attention_mask=attention_mask
        )
        joint_mask = None
        if any(layer.layer_type != CO_ATTENTION for layer in self.layer):
            image_mask = attention_mask.new_ones(image_embeds.shape[:2])
            joint_embeds = torch.cat([image_embeds, text_embeds], dim=1)
            joint_mask = create_bidirectional_mask(
                config=self.config,
                inputs_embeds=joint_embeds,
                attention_mask=torch.cat([image_mask, attention_mask], dim=1),
            )
        return text_mask, joint_mask

    def forward(
        self,
        image_embeds: torch.Tensor,
        text_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        image_index: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fuse text `b` with image `b`, or, with `image_index` `(B,)`, with image `image_index[b]` of `image_embeds`
        (several texts scored against one image: ITM re-ranking). Then each co-attention layer projects every image
        to cross-attention keys/values once, and the texts attend to them through a cross-attention cache, up to the
        first connected-attention layer (which updates the image states per pair)."""
        if image_index is None:
            text_mask, joint_mask = self.masks(image_embeds, text_embeds, attention_mask)
            for layer in self.layer:
                image_embeds, text_embeds = layer(image_embeds, text_embeds, text_mask, joint_mask)
            return image_embeds, text_embeds
        if image_index.shape != text_embeds.shape[:1]:
            raise ValueError(
                f"`image_index` must have one entry per text ({text_embeds.shape[0]}), got {image_index.shape}."
            )
        shared = image_embeds
        count, images = len(image_index), shared.shape[0]
        # texts grouped per image, the same number each (one image against its candidates): attention in groups
        grouped = count % images == 0 and bool(
            (image_index == torch.arange(images, device=image_index.device).repeat_interleave(count // images)).all()
        )
        text_mask, joint_mask = self.masks(shared[:1].expand(len(image_index), -1, -1), text_embeds, attention_mask)
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        pair_images = None
        for layer in self.layer:
            if pair_images is None and layer.layer_type == CO_ATTENTION:
                attention = layer.crossattention.self
                key, value = attention.project_memory(shared)
                if not grouped:  # texts in any order: each takes its image's keys/values (no projection)
                    key, value = key[image_index], value[image_index]
                cache.cross_attention_cache.update(key, value, attention.layer_idx)
                cache.is_updated[attention.layer_idx] = True

                def cross_attention(text: torch.Tensor, layer: MPLUGCrossModalLayer = layer) -> torch.Tensor:
                    return layer.crossattention(text, encoder_hidden_states=shared, **{_CACHE_ARGUMENT: cache})[0]

                _, text_embeds = layer(shared, text_embeds, text_mask, joint_mask, cross_attention=cross_attention)
            else:
                if pair_images is None:
                    pair_images = shared[image_index]
                pair_images, text_embeds = layer(pair_images, text_embeds, text_mask, joint_mask)
        return (shared[image_index] if pair_images is None else pair_images), text_embeds


def _check_model_folder(path: str | os.PathLike | None, kwargs: dict) -> None:
    """A local model folder must hold `config.json` (when no `config=` is given): otherwise transformers would build
    the default (base-size) config and fail later with a wall of size mismatches, or load the wrong model."""
    if path is None or not isinstance(path, (str, os.PathLike)):
        return
    folder = os.fspath(path)
    if kwargs.get("subfolder"):
        folder = os.path.join(folder, kwargs["subfolder"])
    if not os.path.isdir(folder):
        if os.path.isabs(folder) or folder.startswith(("./", "../", "~")):  # a path, not a Hub id
            raise ValueError(f"`pretrained_model_name_or_path` {folder} is not a folder (no such directory).")
        return
    config = kwargs.get("config")
    if config is None or isinstance(config, (str, os.PathLike)):
        config_folder = folder if config is None else os.fspath(config)
        if os.path.isdir(config_folder) and not os.path.isfile(os.path.join(config_folder, "config.json")):
            listing = sorted(os.listdir(folder))
            held = f"it holds {listing[:8]}" if listing else "it is empty"
            raise ValueError(
                f"`pretrained_model_name_or_path` {folder} has no `config.json` ({held}); save the model there with "
                "`model.save_pretrained(folder)`, convert an original checkpoint with "
                "conversion/convert_mplug_original_to_hf.py, or pass `config=`."
            )


def _weight_groups(keys: set[str]) -> list[str]:
    """Module names of state-dict keys, two levels deep under the trunk (`mplug.vision_model`, `text_decoder`)."""
    groups = set()
    for key in keys:
        parts = key.split(".")
        depth = 2 if parts[0] == "mplug" and len(parts) > 2 else 1
        groups.add(".".join(parts[:depth]))
    return sorted(groups)


def _check_missing_weights(cls: type, config: MPLUGConfig, missing: set[str], source: str | os.PathLike | None) -> None:
    """Refuse weights a folder lacks, except a head's own modules when the folder is of another mPLUG class."""
    architectures = list(getattr(config, "architectures", None) or [])
    prefix = f"{cls.base_model_prefix}."
    own_class = not architectures or cls.__name__ in architectures
    trunk_missing = {k for k in missing if k.startswith(prefix)} if cls is not MPLUGModel else set(missing)
    if own_class or trunk_missing:
        refused = sorted(missing if own_class else trunk_missing)
        saved = f"a {architectures[0]} folder" if architectures else "a folder without `architectures`"
        raise ValueError(
            f"`pretrained_model_name_or_path` {source} ({saved}) lacks {len(refused)} weight(s) of "
            f"{cls.__name__}, in {_weight_groups(set(refused))}, e.g. {refused[:3]}: the checkpoint is incomplete or "
            "of another model. Save the model again with `save_pretrained`, or convert the original checkpoint "
            "with conversion/convert_mplug_original_to_hf.py."
        )
    logger.warning(
        "%s is built from a %s folder (%s): %s start fresh (%d weights); fine-tune them before use.",
        cls.__name__,
        architectures[0],
        source,
        ", ".join(_weight_groups(missing)),
        len(missing),
    )


class MPLUGPreTrainedModel(PreTrainedModel):
    config_class = MPLUGConfig
    config: MPLUGConfig
    base_model_prefix = "mplug"
    main_input_name = "pixel_values"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = [
        "CLIPEncoderLayer",
        "CLIPVisionEmbeddings",
        "BertEmbeddings",
        "BertLayer",
        "MPLUGCrossModalLayer",
    ]
    # the attention backends tested against eager (tests/common.py): eager and SDPA; flash/flex are not declared
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False
    _supports_attention_backend = False
    # the losses follow the original normalisation; the Trainer must scale them for gradient accumulation itself
    accepts_loss_kwargs = False

    def resize_token_embeddings(
        self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None, mean_resizing: bool = True
    ) -> nn.Embedding:
        """As `PreTrainedModel.resize_token_embeddings`, for every module that reads or predicts text ids: the text
        encoder's and the decoder's word embeddings (and their momentum copies), the LM heads tied to them, and
        `config.text_config.vocab_size` (so `config.vocab_size`) with the sub-modules' configs."""
        embeddings = super().resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)
        size = embeddings.weight.shape[0]
        for module in self.modules():
            if isinstance(module, BertEmbeddings) and module.word_embeddings.num_embeddings != size:
                module.word_embeddings = self._get_resized_embeddings(
                    module.word_embeddings, size, mean_resizing=mean_resizing
                )
        for module in self.modules():
            predictions = getattr(module, "predictions", None)
            if isinstance(module, BertOnlyMLMHead) and predictions.decoder.out_features != size:
                predictions.decoder = self._get_resized_lm_head(predictions.decoder, size, mean_resizing=mean_resizing)
                predictions.bias = predictions.decoder.bias
        self.config.text_config.vocab_size = size
        for module in self.modules():
            if isinstance(getattr(module, "config", None), BertConfig):
                module.config.vocab_size = size
        self.tie_weights()
        return embeddings

    def _derive_missing_weights(self, missing: set[str]) -> set[str]:
        """Fill weights a checkpoint lacks but that follow from the loaded ones (a pretraining teacher, a second
        image's cross-attention); returns the keys so derived. Heads without such weights derive nothing."""
        return set()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike | None, *args, **kwargs):
        """As `PreTrainedModel.from_pretrained`, strict about what the folder lacks.

        A local folder needs its `config.json` (unless `config=` is given). Every weight of the model must be in the
        checkpoint, except when a head is built from a folder of another mPLUG class (a trunk `MPLUGModel`, a
        pretraining folder, another head): then the head's own modules outside the trunk (`mplug.`) start fresh and a
        warning names them. Weights that follow from the loaded ones (a pretraining teacher from a task folder, the
        second image's cross-attention of a single-image folder) are derived and logged. Anything else missing raises.
        """
        output_loading_info = kwargs.pop("output_loading_info", False)
        _check_model_folder(pretrained_model_name_or_path, kwargs)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
        missing = set(info.get("missing_keys", ()))
        derived = model._derive_missing_weights(missing) if missing else set()
        missing -= derived
        info["missing_keys"] = missing
        if missing:
            _check_missing_weights(cls, model.config, missing, pretrained_model_name_or_path)
        return (model, info) if output_loading_info else model

    @classmethod
    def from_unimodal_pretrained(
        cls,
        vision_model_name_or_path: str,
        text_model_name_or_path: str,
        num_text_layers: int | None = None,
        num_cross_modal_layers: int | None = None,
        num_decoder_layers: int | None = None,
        image_size: int | None = None,
        **config_kwargs,
    ) -> MPLUGPreTrainedModel:
        r"""
        Build this model from unimodal checkpoints, as the paper initialises pretraining: the vision tower from a CLIP
        vision checkpoint, the text encoder from the first `num_text_layers` layers of a BERT checkpoint, the
        cross-modal layers' self-attention and feed-forward from the BERT layers after those, and the decoder's
        embeddings, self-attention and feed-forward from the first BERT layers. Cross-attention, the vision
        projection (when the widths differ) and the heads start fresh.

        Args:
            vision_model_name_or_path (`str`): a `CLIPVisionModel` or `CLIPModel` folder or Hub id.
            text_model_name_or_path (`str`): a BERT folder or Hub id (a `BertModel`-loadable checkpoint).
            num_text_layers (`int`, *optional*): text-encoder depth (default: half the BERT layers).
            num_cross_modal_layers (`int`, *optional*): fusion depth (default: the remaining BERT layers).
            num_decoder_layers (`int`, *optional*): decoder depth (default: all BERT layers).
            image_size (`int`, *optional*): input resolution; the positional embeddings are resized bilinearly.
            config_kwargs: further [`MPLUGConfig`] arguments (`connected_attention_stride`, `projection_dim`, ...).
        """
        from transformers import CLIPVisionModel

        from .original_checkpoint import resize_position_embedding

        vision = CLIPVisionModel.from_pretrained(vision_model_name_or_path)
        text = BertModel.from_pretrained(text_model_name_or_path, add_pooling_layer=False)
        bert_layers = text.config.num_hidden_layers
        num_text_layers = max(1, bert_layers // 2) if num_text_layers is None else num_text_layers
        if num_cross_modal_layers is None:
            num_cross_modal_layers = max(1, bert_layers - num_text_layers)
        num_decoder_layers = bert_layers if num_decoder_layers is None else num_decoder_layers
        if num_text_layers + num_cross_modal_layers > bert_layers or num_decoder_layers > bert_layers:
            raise ValueError(
                f"The BERT checkpoint has {bert_layers} layers: `num_text_layers` + `num_cross_modal_layers` "
                f"({num_text_layers} + {num_cross_modal_layers}) and `num_decoder_layers` ({num_decoder_layers}) "
                "must not exceed it."
            )
        # the checkpoints' own configs, whole (not dicts, which would be merged into mPLUG's defaults)
        vision_config = copy.deepcopy(vision.config)
        if image_size is not None:
            vision_config.image_size = image_size
        text_config = copy.deepcopy(text.config)
        text_config.num_hidden_layers = num_text_layers
        config = MPLUGConfig(
            vision_config=vision_config,
            text_config=text_config,
            num_cross_modal_layers=num_cross_modal_layers,
            num_decoder_layers=num_decoder_layers,
            **config_kwargs,
        )
        model = cls(config)
        vision_state = {k.removeprefix("vision_model."): v for k, v in vision.state_dict().items()}
        table = "embeddings.position_embedding.weight"
        grid = config.vision_config.image_size // config.vision_config.patch_size
        vision_state[table] = resize_position_embedding(vision_state[table], grid)
        vision_state.pop("embeddings.position_ids", None)
        _load_part(model.mplug.vision_model, vision_state, "the vision tower")
        bert = text.state_dict()

        def bert_layer(index: int) -> dict[str, torch.Tensor]:
            prefix = f"encoder.layer.{index}."
            return {k[len(prefix) :]: v for k, v in bert.items() if k.startswith(prefix)}

        embeddings = {k: v for k, v in bert.items() if k.startswith("embeddings.")}
        if model.mplug.text_model is not None:
            state = dict(embeddings)
            for index in range(num_text_layers):
                state.update({f"encoder.layer.{index}.{k}": v for k, v in bert_layer(index).items()})
            _load_part(model.mplug.text_model, state, "the text encoder")
            for index, layer in enumerate(model.mplug.cross_modal_encoder.layer):
                _load_part(layer, bert_layer(num_text_layers + index), f"cross-modal layer {index}", partial=True)
        decoder = getattr(model, "text_decoder", None)
        if decoder is not None:
            state = {f"bert.{k}": v for k, v in embeddings.items()}
            for index in range(num_decoder_layers):
                state.update({f"bert.encoder.layer.{index}.{k}": v for k, v in bert_layer(index).items()})
            _load_part(decoder, state, "the decoder", partial=True)
        if hasattr(model, "copy_student_to_momentum_encoder"):
            model.copy_student_to_momentum_encoder()
        logger.info(
            "Initialised from %s (vision) and %s (text); cross-attention, projections and heads start fresh.",
            vision_model_name_or_path,
            text_model_name_or_path,
        )
        return model

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, MPLUGForRetrieval):
            init.constant_(module.temp, self.config.itc_temperature)
            if isinstance(module, MPLUGForPreTraining):
                init.zeros_(module.image_queue)
                init.zeros_(module.text_queue)
                init.constant_(module.idx_queue, -100)
                init.zeros_(module.queue_ptr)
        elif isinstance(module, CLIPVisionEmbeddings):
            init.normal_(module.class_embedding, mean=0.0, std=module.embed_dim**-0.5)
            init.copy_(module.position_ids, torch.arange(module.num_positions).expand((1, -1)))
        elif isinstance(module, BertEmbeddings):
            init.copy_(module.position_ids, torch.arange(module.position_ids.shape[-1]).expand((1, -1)))
            init.zeros_(module.token_type_ids)


def _load_part(module: nn.Module, state: dict[str, torch.Tensor], name: str, partial: bool = False) -> None:
    """Copy `state` into `module`: every given tensor must have a place of the same shape; with `partial`, the
    module's other weights (cross-attention, heads) keep their fresh values, otherwise all must be given."""
    own = module.state_dict()
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise ValueError(f"Cannot place {len(unknown)} weight(s) in {name}: {unknown[:8]}")
    bad = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items() if v.shape != own[k].shape]
    if bad:
        raise ValueError(f"Shape mismatch in {name}: {bad[:8]}")
    missing = sorted(k for k in set(own) - set(state) if not k.endswith(("position_ids", "token_type_ids")))
    if missing and not partial:
        raise ValueError(f"The checkpoint lacks {len(missing)} weight(s) of {name}: {missing[:8]}")
    own.update(state)
    module.load_state_dict(own, strict=True)


class MPLUGModel(MPLUGPreTrainedModel):
    r"""
    The mPLUG trunk: image -> CLIP ViT (-> projection) = V; text -> BERT = T; (V, T) -> skip-connected cross-modal
    encoder -> (V', T'). Task heads put a decoder or classifiers on top.

    Example:
        >>> import torch
        >>> from transformers_mplug import MPLUGConfig, MPLUGModel
        >>> config = MPLUGConfig(
        ...     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        ...                        image_size=32, patch_size=16, hidden_act="quick_gelu"),
        ...     text_config=dict(vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        ...                      intermediate_size=64),
        ...     cross_modal_layer_types=["co_attention", "connected_attention"], num_decoder_layers=1,
        ...     bos_token_id=1, eos_token_id=2,
        ... )
        >>> model = MPLUGModel(config).eval()
        >>> out = model(pixel_values=torch.randn(1, 3, 32, 32), input_ids=torch.tensor([[1, 5, 6]]))
        >>> tuple(out.last_hidden_state.shape)  # 5 image tokens + 3 text tokens
        (1, 8, 32)
    """

    # transformers' output capturing: the vision tower and the cross-modal layers are plain modules of the trunk (the
    # text encoder is a BertModel, which records its own)
    _can_record_outputs = {
        "vision_hidden_states": [
            OutputRecorder(nn.LayerNorm, layer_name="vision_model.pre_layrnorm"),  # the input of the first layer
            OutputRecorder(CLIPEncoderLayer, index=0, layer_name="vision_model.encoder"),
        ],
        "vision_attentions": OutputRecorder(CLIPAttention, index=1, layer_name="vision_model.encoder"),
        "fusion_image_hidden_states": OutputRecorder(MPLUGCrossModalLayer, index=0),
        "fusion_text_hidden_states": OutputRecorder(MPLUGCrossModalLayer, index=1),
        "fusion_attentions": OutputRecorder(BertSelfAttention, index=1, layer_name="cross_modal_encoder"),
        "fusion_cross_attentions": OutputRecorder(BertCrossAttention, index=1, layer_name="cross_modal_encoder"),
    }

    def __init__(self, config: MPLUGConfig, vision_only: bool = False) -> None:
        r"""
        vision_only (`bool`, *optional*, defaults to `False`):
            Build only the vision tower (+ projection): what the captioner runs. The text encoder and the
            cross-modal encoder are then absent, and `forward` needs no text.
        """
        super().__init__(config)
        self.vision_only = vision_only
        for sub_config in (config.vision_config, config.text_config):
            if sub_config._attn_implementation is None:
                sub_config._attn_implementation = config._attn_implementation
        self.vision_model = MPLUGVisionTransformer(config.vision_config)
        self.vision_projection = MPLUGVisionProjection(config) if config.has_vision_projection else None
        self.text_model = None if vision_only else BertModel(config.text_config, add_pooling_layer=False)
        self.cross_modal_encoder = None if vision_only else MPLUGCrossModalEncoder(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module | None:
        return None if self.text_model is None else self.text_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.text_model.set_input_embeddings(value)

    def encode_image(
        self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the vision tower (and projection) on images `(B, C, H, W)` or videos `(B, T, C, H, W)`.

        Video frames are encoded independently and their token sequences concatenated to `(B, T * N, D)`.
        Returns `(vision_last_hidden_state, image_embeds)`; they are the same tensor when there is no projection.
        """
        if not isinstance(pixel_values, torch.Tensor):
            raise TypeError(f"`pixel_values` must be a torch.Tensor, got {type(pixel_values).__name__}.")
        if pixel_values.dim() not in (4, 5):
            raise ValueError(
                "`pixel_values` must have shape (batch, channels, height, width) or, for video, "
                f"(batch, frames, channels, height, width); got {tuple(pixel_values.shape)}."
            )
        num_channels = self.config.vision_config.num_channels
        if pixel_values.shape[-3] != num_channels:
            raise ValueError(
                f"`pixel_values` must have {num_channels} channels in dimension -3, got shape {tuple(pixel_values.shape)}."
            )
        if not bool(torch.isfinite(pixel_values).all()):
            raise ValueError(
                "`pixel_values` contains NaN or inf; check the images and their preprocessing (the processor's output "
                "is always finite)."
            )
        batch_size = pixel_values.shape[0]
        frames = pixel_values.flatten(0, 1) if pixel_values.dim() == 5 else pixel_values
        vision_states = self.vision_model(frames, interpolate_pos_encoding=interpolate_pos_encoding)
        if pixel_values.dim() == 5:
            vision_states = vision_states.reshape(batch_size, -1, vision_states.shape[-1])
        image_embeds = vision_states if self.vision_projection is None else self.vision_projection(vision_states)
        return vision_states, image_embeds

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run the BERT text encoder; returns its last hidden state `(B, L, hidden_size)`."""
        attention_mask = self._checked_text(input_ids, attention_mask)
        return self._text_output(input_ids, attention_mask).last_hidden_state

    def _checked_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Check the text ids (range, shape, length) and return the attention mask (derived from `[PAD]` if absent)."""
        if self.text_model is None:
            raise ValueError("This trunk was built with `vision_only=True`: it has no text encoder.")
        _check_ids(input_ids, "input_ids", self.config.text_config.vocab_size)
        if input_ids.dim() != 2:
            raise ValueError(f"`input_ids` must have shape (batch, length), got {tuple(input_ids.shape)}.")
        attention_mask = _text_attention_mask(input_ids, attention_mask, self.config.pad_token_id)
        positions = self.config.text_config.max_position_embeddings
        if input_ids.shape[1] > positions:
            raise ValueError(
                f"`input_ids` has {input_ids.shape[1]} tokens, more than the text encoder's {positions} positions; "
                f"encode the text with the processor (it truncates to `model_max_length`) or pass `max_length={positions}`."
            )
        return attention_mask

    def _text_output(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, output_hidden_states=False, output_attentions=False
    ):
        """The BERT text encoder's output (ids and mask checked by the callers)."""
        return self.text_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            return_dict=True,
        )

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MPLUGModelOutput | tuple[torch.Tensor, ...]:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(B, C, H, W)` or `(B, T, C, H, W)` for video):
                Images as produced by [`MPLUGProcessor`]. Not needed when `image_embeds` is given.
            input_ids (`torch.LongTensor` of shape `(B, L)`):
                Text ids in the mPLUG contract (`[CLS] text`, no trailing `[SEP]`). A `vision_only` trunk (the
                captioner's) takes none and returns the image features as `last_hidden_state`.
            attention_mask (`torch.LongTensor` of shape `(B, L)`, *optional*):
                1 for real tokens, 0 for padding. Defaults to all ones.
            image_embeds (`torch.FloatTensor` of shape `(B, N, hidden_size)`, *optional*):
                Precomputed V (the second output of [`~MPLUGModel.encode_image`]) to skip the vision tower.
            output_hidden_states, output_attentions (`bool`, *optional*):
                Return every stage's hidden states / attention weights (see [`MPLUGModelOutput`]), recorded by
                transformers' output capturing.
        """
        _reject_unused_kwargs(self, kwargs, ignored=())
        hidden, attentions = _output_flags(self.config, output_hidden_states, output_attentions)
        flags = self._recording_flags(hidden, attentions)
        output = self._recorded_forward(
            pixel_values,
            input_ids,
            attention_mask,
            image_embeds,
            interpolate_pos_encoding,
            text_outputs=(hidden, attentions),
            return_dict=True,
            **flags,
        )
        return output

    def _recording_flags(self, output_hidden_states: bool, output_attentions: bool) -> dict[str, bool]:
        flags = {f"output_{name}": output_hidden_states for name in _RECORDED_HIDDEN_STATES}
        flags.update({f"output_{name}": output_attentions for name in _RECORDED_ATTENTIONS})
        if self.vision_only:  # no cross-modal encoder to record
            flags.update({name: False for name in flags if name.startswith("output_fusion_")})
        return flags

    def encode_separately(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> MPLUGModelOutput:
        """The vision tower (+ projection) and the text encoder without the cross-modal encoder (what ITC and the
        pair fusion of visual reasoning start from): `image_embeds`, `text_embeds` and, when asked, the `vision_*` /
        `text_*` recorded states. The image and text batches may differ in size; either side may be left out."""
        return self._encode_separately(
            pixel_values,
            input_ids,
            attention_mask,
            image_embeds,
            text_outputs=(output_hidden_states, output_attentions),
            return_dict=True,
            output_vision_hidden_states=output_hidden_states,
            output_vision_attentions=output_attentions,
        )

    @capture_outputs(tie_last_hidden_states=False)
    def _encode_separately(
        self,
        pixel_values: torch.Tensor | None,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        image_embeds: torch.Tensor | None,
        text_outputs: tuple[bool, bool],
        **recording_flags: bool,
    ) -> MPLUGModelOutput:
        if pixel_values is None and image_embeds is None and input_ids is None:
            raise ValueError("Pass `pixel_values` (or precomputed `image_embeds`), `input_ids`, or both.")
        if image_embeds is None and pixel_values is not None:
            image_embeds = self.encode_image(pixel_values)[1]
        elif pixel_values is not None:
            raise ValueError("Pass either `pixel_values` or `image_embeds`, not both.")
        if input_ids is None:
            return MPLUGModelOutput(image_embeds=image_embeds)
        text = self._text_output(input_ids, self._checked_text(input_ids, attention_mask), *text_outputs)
        return MPLUGModelOutput(
            image_embeds=image_embeds,
            text_embeds=text.last_hidden_state,
            text_hidden_states=text.hidden_states,
            text_attentions=text.attentions,
        )

    @capture_outputs(tie_last_hidden_states=False)
    def _recorded_forward(
        self,
        pixel_values: torch.Tensor | None,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        image_embeds: torch.Tensor | None,
        interpolate_pos_encoding: bool,
        text_outputs: tuple[bool, bool],
        **recording_flags: bool,
    ) -> MPLUGModelOutput:
        """The forward pass; `capture_outputs` fills the recorded fields named by the `output_<field>` flags."""
        if self.vision_only:
            if input_ids is not None:
                raise ValueError("This trunk was built with `vision_only=True` (captioning): it takes no `input_ids`.")
            if pixel_values is None:
                raise ValueError("Pass `pixel_values`.")
            vision_states, image_embeds = self.encode_image(pixel_values, interpolate_pos_encoding)
            return MPLUGModelOutput(
                last_hidden_state=image_embeds,
                memory_attention_mask=torch.ones(image_embeds.shape[:2], dtype=torch.long, device=image_embeds.device),
                image_embeds=image_embeds,
                vision_last_hidden_state=vision_states,
            )
        if input_ids is None:
            raise ValueError("`input_ids` is required: pass the processor's text ids.")
        attention_mask = self._checked_text(input_ids, attention_mask)

        vision_states = None
        if image_embeds is None:
            if pixel_values is None:
                raise ValueError("Pass `pixel_values` (or precomputed `image_embeds`).")
            vision_states, image_embeds = self.encode_image(pixel_values, interpolate_pos_encoding)
        elif pixel_values is not None:
            raise ValueError("Pass either `pixel_values` or `image_embeds`, not both.")
        if image_embeds.shape[0] != input_ids.shape[0]:
            raise ValueError(
                f"Batch size mismatch: {image_embeds.shape[0]} images but {input_ids.shape[0]} texts in `input_ids`."
            )
        if image_embeds.shape[-1] != self.config.hidden_size:
            raise ValueError(
                f"`image_embeds` must have width {self.config.hidden_size} (after the vision projection), "
                f"got {image_embeds.shape[-1]}."
            )

        text = self._text_output(input_ids, attention_mask, *text_outputs)
        text_embeds = text.last_hidden_state
        fused_image, fused_text = self.cross_modal_encoder(image_embeds, text_embeds, attention_mask)
        memory = torch.cat([fused_image, fused_text], dim=1)
        memory_mask = torch.cat([attention_mask.new_ones(fused_image.shape[:2]), attention_mask], dim=1)
        return MPLUGModelOutput(
            last_hidden_state=memory,
            memory_attention_mask=memory_mask,
            fused_image_embeds=fused_image,
            fused_text_embeds=fused_text,
            image_embeds=image_embeds,
            text_embeds=text_embeds,
            vision_last_hidden_state=vision_states,
            text_hidden_states=text.hidden_states,
            text_attentions=text.attentions,
        )


# ------------------------------------------------------------------------------------------------ decoder memory
class MPLUGSharedMemoryCrossAttention(BertCrossAttention):
    """The decoder's cross-attention to the memory, with the memory's keys/values computed once per image and shared
    by every sequence decoded for it (beam hypotheses, candidate answers).

    When the cached keys/values have fewer rows than the queries (`queries = images * group`, rows grouped per image
    as `generate` expands them), the queries of each group attend to their image's keys/values in one batched call
    of the attention interface. Same parameters (`query`, `key`, `value`) and outputs as `BertCrossAttention`.
    """

    def project_memory(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values `(B, heads, N, head_size)` of a memory `(B, N, hidden_size)`."""
        shape = (*memory.shape[:-1], -1, self.attention_head_size)
        return self.key(memory).view(shape).transpose(1, 2), self.value(memory).view(shape).transpose(1, 2)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: EncoderDecoderCache | None = None,
        past_key_values: EncoderDecoderCache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        cache = cache if cache is not None else past_key_values  # the cache's name differs across releases
        batch_size, length = hidden_states.shape[:2]
        heads, head_size = self.num_attention_heads, self.attention_head_size
        query = self.query(hidden_states).view(batch_size, length, heads, head_size).transpose(1, 2)
        if cache is not None and cache.is_updated.get(self.layer_idx):
            layer = cache.cross_attention_cache.layers[self.layer_idx]
            key, value = layer.keys, layer.values
        else:
            key, value = self.project_memory(encoder_hidden_states)
            if cache is not None:
                key, value = cache.cross_attention_cache.update(key, value, self.layer_idx)
                cache.is_updated[self.layer_idx] = True
        images = key.shape[0]
        if batch_size % images:
            raise ValueError(f"{batch_size} decoder rows cannot share the memory of {images} images.")
        group = batch_size // images
        if group > 1:  # (images * group, heads, L, d) -> (images, heads, group * L, d)
            query = query.view(images, group, heads, length, head_size).transpose(1, 2)
            query = query.reshape(images, heads, group * length, head_size)
            if attention_mask is not None:
                attention_mask = attention_mask[::group]
                if attention_mask.dim() == 4 and attention_mask.shape[-2] > 1:
                    attention_mask = attention_mask.repeat(1, 1, group, 1)
        interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        output, weights = interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=0.0 if not self.training else self.dropout.p,
            scaling=self.scaling,
            **kwargs,
        )
        output = output.reshape(batch_size, length, heads * head_size).contiguous()
        if weights is not None and group > 1:
            weights = (
                weights.view(images, heads, group, length, -1).transpose(1, 2).reshape(batch_size, heads, length, -1)
            )
        return output, weights


class MPLUGSharedMemoryCache(EncoderDecoderCache):
    """An [`EncoderDecoderCache`] whose cross-attention part holds the memory's keys/values once per image: beam
    search reorders only the self-attention part (the memory of an image is the same for all its beams)."""

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.self_attention_cache.reorder_cache(beam_idx)


def _share_memory_across_sequences(decoder: BertLMHeadModel) -> BertLMHeadModel:
    """Swap the decoder's cross-attention for [`MPLUGSharedMemoryCrossAttention`] (same parameter names)."""
    for layer in decoder.bert.encoder.layer:
        old = layer.crossattention.self
        layer.crossattention.self = MPLUGSharedMemoryCrossAttention(old.config, layer_idx=old.layer_idx)
    return decoder


# ------------------------------------------------------------------------------------------------ task heads
@dataclass
class MPLUGDecoderOutput(ModelOutput):
    r"""
    Output of the decoder heads ([`MPLUGForQuestionAnswering`], [`MPLUGForCaptioning`]).

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*): the task's training loss (see the head).
        logits (`torch.FloatTensor` of shape `(num_sequences, length, vocab_size)`):
            Decoder prediction scores for every position (position `t` predicts token `t + 1`).
        loss_per_sequence (`torch.FloatTensor` of shape `(num_sequences,)`, *optional*):
            Summed token negative log-likelihood of each target sequence.
        memory (`torch.FloatTensor` of shape `(batch_size, memory_length, hidden_size)`):
            What the decoder attended to (per question / image, before repetition over answers).
        memory_attention_mask (`torch.LongTensor` of shape `(batch_size, memory_length)`): its mask.
        vision_hidden_states, ..., fusion_cross_attentions (*optional*, with `output_hidden_states=True` /
            `output_attentions=True`): the trunk's recorded states, as in [`MPLUGModelOutput`] (the captioner has
            the vision ones only).
        decoder_hidden_states, decoder_attentions, decoder_cross_attentions (`tuple(torch.FloatTensor)`, *optional*):
            The decoder's hidden states (embeddings, then each layer), self-attention and memory cross-attention
            weights (eager attention), over the decoded sequences.
        cache (`Cache`, *optional*, with `use_cache=True`): the decoder's self-attention cache and the memory's
            cross-attention keys/values, to pass back with the next tokens (step-by-step decoding); also readable as
            `past_key_values`, its name before transformers 5.24.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    loss_per_sequence: torch.FloatTensor | None = None
    memory: torch.FloatTensor | None = None
    memory_attention_mask: torch.LongTensor | None = None
    vision_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    vision_attentions: tuple[torch.FloatTensor, ...] | None = None
    text_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    text_attentions: tuple[torch.FloatTensor, ...] | None = None
    fusion_image_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    fusion_text_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    fusion_attentions: tuple[torch.FloatTensor, ...] | None = None
    fusion_cross_attentions: tuple[torch.FloatTensor, ...] | None = None
    decoder_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    decoder_attentions: tuple[torch.FloatTensor, ...] | None = None
    decoder_cross_attentions: tuple[torch.FloatTensor, ...] | None = None
    cache: Cache | None = None

    @property
    def past_key_values(self) -> Cache | None:
        return self.cache


@dataclass
class MPLUGAnswerRankingOutput(ModelOutput):
    r"""
    Output of [`MPLUGForQuestionAnswering.rank_answers`].

    Args:
        indices (`torch.LongTensor` of shape `(batch_size, k)`): candidate indices, best first.
        probabilities (`torch.FloatTensor` of shape `(batch_size, k)`):
            Probabilities over the `k` re-ranked candidates (they sum to 1 per question), sorted descending.
        first_token_probabilities (`torch.FloatTensor` of shape `(batch_size, num_candidates)`):
            Probability of each candidate's first token after `[CLS]`: the pre-selection score.
    """

    indices: torch.LongTensor | None = None
    probabilities: torch.FloatTensor | None = None
    first_token_probabilities: torch.FloatTensor | None = None


def _sequence_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token negative log-likelihood per row (`labels` use -100 for ignored positions)."""
    shifted = logits[:, :-1].float()
    targets = labels[:, 1:]
    token_nll = nn.functional.cross_entropy(
        shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="none"
    )
    return token_nll.view(targets.shape).sum(dim=1)


def _decoder_inputs(
    labels: torch.Tensor | None,
    input_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    pad_token_id: int,
    names: tuple[str, str] = ("decoder_input_ids", "decoder_attention_mask"),
    vocab_size: int | None = None,
    past_length: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Decoder ids/mask from explicit ids or from `labels` (-100 = padding); labels from ids when absent; ids
    checked against `vocab_size`. After `past_length` cached tokens the mask covers the cached and the new tokens."""
    if vocab_size is not None:
        if labels is not None:
            _check_ids(labels, "labels", vocab_size, ignore_index=-100)
        if input_ids is not None:
            _check_ids(input_ids, names[0], vocab_size)
    if input_ids is None:
        if labels is None:
            raise ValueError(f"Pass `labels` (targets from the processor's `text_target`) or `{names[0]}`.")
        input_ids = labels.masked_fill(labels == -100, pad_token_id)
        if attention_mask is None:
            attention_mask = (labels != -100).long()
    if input_ids.dim() != 2:
        raise ValueError(f"`{names[0]}` must have shape (num_sequences, length), got {tuple(input_ids.shape)}.")
    if attention_mask is None:
        attention_mask = (input_ids != pad_token_id).long()
        if past_length:
            attention_mask = torch.cat([attention_mask.new_ones(input_ids.shape[0], past_length), attention_mask], 1)
        else:
            attention_mask[:, 0] = 1
    expected = (input_ids.shape[0], past_length + input_ids.shape[1])
    if attention_mask.shape != expected:
        cached = f" (the {past_length} cached tokens, then the new ones)" if past_length else ""
        raise ValueError(f"`{names[1]}` must have shape {expected}{cached}, got {tuple(attention_mask.shape)}.")
    if labels is not None and labels.shape != input_ids.shape:
        raise ValueError(
            f"`labels` shape {tuple(labels.shape)} must equal `{names[0]}` shape {tuple(input_ids.shape)}."
        )
    return input_ids, attention_mask, labels


class MPLUGDecoderHeadMixin:
    """Shared pieces of the heads that put the BERT decoder (`text_decoder`, a `BertLMHeadModel`) on a memory."""

    text_decoder: BertLMHeadModel
    config: MPLUGConfig
    _tied_weights_keys = {
        "text_decoder.cls.predictions.decoder.weight": "text_decoder.bert.embeddings.word_embeddings.weight",
        "text_decoder.cls.predictions.decoder.bias": "text_decoder.cls.predictions.bias",
    }

    def get_input_embeddings(self) -> nn.Module:
        return self.text_decoder.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.text_decoder.set_input_embeddings(value)

    @staticmethod
    def _decoding_config(
        config: MPLUGConfig, num_beams: int, min_new_tokens: int, max_new_tokens: int
    ) -> GenerationConfig:
        """The original decoding (`decoding_mode="original"`: the original beam search) with these settings."""
        return GenerationConfig(
            decoding_mode=ORIGINAL,
            num_beams=num_beams,
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            bos_token_id=config.bos_token_id,
            eos_token_id=config.eos_token_id,
            pad_token_id=config.pad_token_id,
            decoder_start_token_id=config.bos_token_id,
        )

    def _fused_memory(self, pixel_values, input_ids, attention_mask, image_embeds) -> tuple[torch.Tensor, torch.Tensor]:
        """`concat(V', T')` and its mask `concat(ones, attention_mask)` from the trunk."""
        return self._fused_trunk(pixel_values, input_ids, attention_mask, image_embeds)[1:]

    def _fused_trunk(
        self, pixel_values, input_ids, attention_mask, image_embeds, hidden: bool = False, attentions: bool = False
    ) -> tuple[MPLUGModelOutput, torch.Tensor, torch.Tensor]:
        """The trunk's output (recording as asked), the memory `concat(V', T')` and its mask."""
        trunk = self.mplug(
            pixel_values=pixel_values,
            input_ids=input_ids,
            attention_mask=attention_mask,
            image_embeds=image_embeds,
            output_hidden_states=hidden,
            output_attentions=attentions,
            return_dict=True,
        )
        return trunk, trunk.last_hidden_state, trunk.memory_attention_mask

    def get_output_embeddings(self) -> nn.Module:
        return self.text_decoder.get_output_embeddings()

    def set_output_embeddings(self, new_embeddings: nn.Module) -> None:
        self.text_decoder.set_output_embeddings(new_embeddings)

    def adjust_generation_fn(self, generation_config, *args, **kwargs):
        super().adjust_generation_fn(generation_config, *args, **kwargs)
        # a folder without generation_config.json (a trunk or pretraining folder): keep the task's decoding defaults
        # rather than a config built from config.json (greedy, 20 tokens)
        if generation_config is None and getattr(self.generation_config, "_from_model_config", False):
            default = getattr(type(self), "default_generation_config", None)
            if default is not None:
                self.generation_config = default(self.config)

    def _decode(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        memory: torch.Tensor,
        memory_mask: torch.Tensor,
    ) -> torch.Tensor:
        return self._decoder_output(input_ids, attention_mask, memory, memory_mask).logits

    def _decoder_output(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        memory: torch.Tensor,
        memory_mask: torch.Tensor,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        past_key_values: Cache | None = None,
        use_cache: bool = False,
    ):
        """The decoder (a `BertLMHeadModel`, which records its own hidden states/attentions) over the memory; with
        `use_cache`, a new cache starts with the memory's cross-attention keys/values."""
        if use_cache and past_key_values is None:
            past_key_values = self._memory_cache(memory)
        return self.text_decoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=memory,
            encoder_attention_mask=memory_mask,
            use_cache=use_cache,
            **{_CACHE_ARGUMENT: past_key_values},
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            return_dict=True,
        )

    @staticmethod
    def _cache_arguments(
        cache: Cache | None, past_key_values: Cache | None, use_cache: bool | None
    ) -> tuple[Cache | None, bool, int]:
        """`(cache, use_cache, past_length)` of a forward call: the cache is used when given (as `cache`, or
        `past_key_values` as before transformers 5.24) or asked for (`use_cache=True`); forward's default is no
        cache (`generate` keeps its own)."""
        if cache is not None and past_key_values is not None:
            raise ValueError("Pass the cache as `cache` or `past_key_values`, not both.")
        past_key_values = cache if cache is not None else past_key_values
        if past_key_values is not None and not isinstance(past_key_values, Cache):
            raise TypeError(
                f"`cache` must be the `Cache` a previous call returned, got {type(past_key_values).__name__}."
            )
        if use_cache is None:
            use_cache = past_key_values is not None
        if not isinstance(use_cache, bool):
            raise TypeError(f"`use_cache` must be True or False, got {use_cache!r}.")
        if past_key_values is not None and not use_cache:
            raise ValueError("A `cache` is given with `use_cache=False`; pass `use_cache=True` or no cache.")
        past_length = 0 if past_key_values is None else past_key_values.get_seq_length()
        return past_key_values, use_cache, past_length

    @staticmethod
    def _decoder_recorded(decoded) -> dict:
        fields = {
            "decoder_hidden_states": decoded.hidden_states,
            "decoder_attentions": decoded.attentions,
            "decoder_cross_attentions": getattr(decoded, "cross_attentions", None),
            "cache": getattr(decoded, _CACHE_ARGUMENT, None),
        }
        return {name: value for name, value in fields.items() if value is not None}

    def _memory_cache(self, memory: torch.Tensor) -> MPLUGSharedMemoryCache:
        """A decoding cache holding the memory's cross-attention keys/values, computed here once per image."""
        cache = MPLUGSharedMemoryCache(DynamicCache(), DynamicCache())
        for index, layer in enumerate(self.text_decoder.bert.encoder.layer):
            key, value = layer.crossattention.self.project_memory(memory)
            cache.cross_attention_cache.update(key, value, index)
            cache.is_updated[index] = True
        return cache

    def _generate_from_memory(
        self,
        memory: torch.Tensor,
        memory_mask: torch.Tensor,
        prompt_ids: torch.Tensor | None,
        generation_config: GenerationConfig | None,
        kwargs: dict,
    ):
        for name in ("token_type_ids", "decoder_input_ids", "encoder_hidden_states", "encoder_attention_mask"):
            if name in kwargs and name != "token_type_ids":
                raise ValueError(f"`{name}` is computed by generate(); do not pass it.")
            kwargs.pop(name, None)
        if "custom_generate" in kwargs:
            raise ValueError("`custom_generate` is set by `decoding_mode`; pass decoding_mode='transformers' instead.")
        generation_config = copy.deepcopy(
            generation_config if generation_config is not None else self.generation_config
        )
        mode = resolve_decoding_mode(generation_config, kwargs)
        if prompt_ids is None:
            default_prompt = getattr(generation_config, "decoder_prompt_ids", None)
            if default_prompt:
                prompt_ids = self._check_prompt(torch.tensor([list(default_prompt)], device=memory.device))
                prompt_ids = prompt_ids.expand(memory.shape[0], -1)
            else:
                prompt_ids = torch.full(
                    (memory.shape[0], 1), self.config.bos_token_id, dtype=torch.long, device=memory.device
                )
        model_kwargs = generation_config.update(**kwargs)
        validate_decoding(
            generation_config,
            prompt_ids.shape[1],
            self.text_decoder.config.max_position_embeddings,
            mode,
            model_kwargs,
        )
        if generation_config.use_cache is not False and _CACHE_ARGUMENT not in model_kwargs:
            # the memory's keys/values are computed once per image and shared by its beams (see
            # MPLUGSharedMemoryCrossAttention); the self-attention part grows as tokens are generated
            model_kwargs[_CACHE_ARGUMENT] = self._memory_cache(memory)
        if mode == ORIGINAL:
            model_kwargs["custom_generate"] = original_beam_search
        output = self.text_decoder.generate(
            input_ids=prompt_ids,
            attention_mask=torch.ones_like(prompt_ids),
            encoder_hidden_states=memory,
            encoder_attention_mask=memory_mask,
            generation_config=generation_config,
            **model_kwargs,
        )
        if mode != ORIGINAL:
            # transformers' beam search fills finished sequences with `[SEP]` when the pad id is 0 (falsy); pad with
            # `[PAD]` after the first generated `[SEP]`, as greedy decoding and the original mode do
            sequences = output if isinstance(output, torch.Tensor) else output.sequences
            generated = sequences[:, prompt_ids.shape[1] :]
            is_eos = generated == self.config.eos_token_id
            after_eos = (is_eos.cumsum(dim=1) - is_eos.long()) > 0
            generated.masked_fill_(after_eos, self.config.pad_token_id)
        return output

    def _check_prompt(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.dim() != 2 or input_ids.shape[1] < 1 or bool((input_ids[:, 0] != self.config.bos_token_id).any()):
            raise ValueError(
                "The decoder prompt (`input_ids`, or `decoder_prompt_ids` of the generation config) must be a "
                f"(1 or batch, length) list/tensor of ids starting with `[CLS]` ({self.config.bos_token_id}), got "
                f"{input_ids.tolist()}."
            )
        return input_ids


class MPLUGForQuestionAnswering(MPLUGDecoderHeadMixin, MPLUGPreTrainedModel, GenerationMixin):
    r"""
    mPLUG for visual question answering: the trunk, then a BERT decoder (with cross-attention, LM head tied to its
    word embeddings) over the memory `concat(V', T')` with mask `concat(ones, question mask)`.

    - `forward(..., labels=...)`: the original weighted loss `sum_i w_i * sum_t NLL_{i,t} / batch_size` over answers
      (several per question with `answer_question_index` or `answers_per_question`, weights in `answer_weights`).
    - `generate(pixel_values, input_ids, attention_mask, **generation_kwargs)`: free-form answers (5 beams,
      1-10 new tokens by default); the image and question are encoded once per call.
    - `rank_answers(...)`: closed-vocabulary ranking as the original (`k` candidates by first-token probability,
      re-scored by the full answer log-likelihood).

    Example:
        >>> import torch
        >>> from transformers_mplug import MPLUGConfig, MPLUGForQuestionAnswering
        >>> config = MPLUGConfig(
        ...     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        ...                        image_size=32, patch_size=16),
        ...     text_config=dict(vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        ...                      intermediate_size=64),
        ...     num_cross_modal_layers=2, num_decoder_layers=1, bos_token_id=101, eos_token_id=102,
        ... )
        >>> model = MPLUGForQuestionAnswering(config).eval()
        >>> pixel_values, question = torch.randn(1, 3, 32, 32), torch.tensor([[101, 7, 8]])
        >>> answer = torch.tensor([[101, 9, 102]])
        >>> model(pixel_values=pixel_values, input_ids=question, labels=answer).loss.shape
        torch.Size([])
        >>> model.generate(pixel_values=pixel_values, input_ids=question, max_new_tokens=3).shape[1] <= 4
        True
    """

    def __init__(self, config: MPLUGConfig) -> None:
        super().__init__(config)
        self.mplug = MPLUGModel(config)
        self.text_decoder = _share_memory_across_sequences(BertLMHeadModel(config.text_decoder_config))
        self.post_init()
        self.generation_config = self.default_generation_config(config)

    @classmethod
    def default_generation_config(cls, config: MPLUGConfig) -> GenerationConfig:
        """The original VQA decoding: beam search with 5 beams, 1 to 10 new tokens, `[CLS]` -> ... -> `[SEP]`."""
        return cls._decoding_config(config, num_beams=5, min_new_tokens=1, max_new_tokens=10)

    @staticmethod
    def _answer_index(
        batch_size: int,
        num_answers: int,
        answer_question_index: torch.Tensor | None,
        answers_per_question: torch.Tensor | list[int] | None,
        device: torch.device,
    ) -> torch.Tensor:
        if answer_question_index is not None and answers_per_question is not None:
            raise ValueError("Pass `answer_question_index` or `answers_per_question`, not both.")
        if answers_per_question is not None:
            counts = torch.as_tensor(answers_per_question, dtype=torch.long, device=device)
            if counts.dim() != 1 or counts.numel() != batch_size or bool((counts < 1).any()):
                raise ValueError(
                    f"`answers_per_question` must hold one positive count per question ({batch_size}), got {counts.tolist()}."
                )
            answer_question_index = torch.repeat_interleave(torch.arange(batch_size, device=device), counts)
        if answer_question_index is None:
            if num_answers != batch_size:
                raise ValueError(
                    f"{num_answers} answers for {batch_size} questions: pass `answer_question_index` or "
                    "`answers_per_question` to say which question each answer belongs to."
                )
            return torch.arange(batch_size, device=device)
        answer_question_index = torch.as_tensor(answer_question_index, dtype=torch.long, device=device)
        if answer_question_index.shape != (num_answers,):
            raise ValueError(
                f"`answer_question_index`/`answers_per_question` cover {answer_question_index.numel()} answers but "
                f"`labels` has {num_answers}."
            )
        if bool((answer_question_index < 0).any()) or bool((answer_question_index >= batch_size).any()):
            raise ValueError(f"`answer_question_index` values must be in [0, {batch_size}).")
        return answer_question_index

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        answer_weights: torch.Tensor | None = None,
        answer_question_index: torch.Tensor | None = None,
        answers_per_question: torch.Tensor | list[int] | None = None,
        image_embeds: torch.Tensor | None = None,
        encoder_outputs: MPLUGModelOutput | None = None,
        cache: Cache | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MPLUGDecoderOutput | tuple:
        r"""
        Args:
            pixel_values, input_ids, attention_mask, image_embeds: image(s) and question(s), as for [`MPLUGModel`].
            encoder_outputs ([`MPLUGModelOutput`], *optional*): the trunk's output for these questions (e.g. from a
                first call, `MPLUGModelOutput(last_hidden_state=out.memory, memory_attention_mask=...)`), to decode
                without encoding again; then no image or question is passed.
            cache (or past_key_values), use_cache: step-by-step decoding as in transformers: `use_cache=True`
                returns `cache` (the decoder's cache, with the memory's keys/values); pass it back with only the new
                `decoder_input_ids` (and a `decoder_attention_mask` over the cached and new tokens, if any).
            output_hidden_states, output_attentions: every stage's hidden states / attentions (trunk and decoder).
            labels (`torch.LongTensor` of shape `(num_answers, length)`):
                Answers `[CLS] answer [SEP]`, padding -100 (the processor's `text_target`). The loss is
                `sum_i answer_weights[i] * NLL(answer i) / batch_size`, NLL summed over its tokens.
            decoder_input_ids, decoder_attention_mask: the answers as decoder inputs (derived from `labels` if absent).
            answer_weights (`torch.FloatTensor` of shape `(num_answers,)`): VQA soft scores (default 1).
            answer_question_index (`torch.LongTensor` of shape `(num_answers,)`): question of each answer, or
            answers_per_question (`list[int]` of length `batch_size`): number of consecutive answers per question.
        """
        _reject_unused_kwargs(self, kwargs)
        if labels is None and decoder_input_ids is None:
            raise ValueError(
                "Pass the answers as `labels` (training) or `decoder_input_ids`; for inference use `generate()` or "
                "`rank_answers()`."
            )
        past_key_values, use_cache, past_length = self._cache_arguments(cache, past_key_values, use_cache)
        decoder_input_ids, decoder_attention_mask, labels = _decoder_inputs(
            labels,
            decoder_input_ids,
            decoder_attention_mask,
            self.config.pad_token_id,
            vocab_size=self.config.vocab_size,
            past_length=past_length,
        )
        hidden, attentions = _output_flags(self.config, output_hidden_states, output_attentions)
        if encoder_outputs is not None:
            if any(value is not None for value in (pixel_values, input_ids, image_embeds)):
                raise ValueError("Pass `encoder_outputs` or the image and question, not both.")
            if not isinstance(encoder_outputs, MPLUGModelOutput) or encoder_outputs.last_hidden_state is None:
                raise TypeError(
                    "`encoder_outputs` must be an `MPLUGModelOutput` with `last_hidden_state` (the memory)."
                )
            trunk = encoder_outputs
            memory, memory_mask = trunk.last_hidden_state, trunk.memory_attention_mask
            if memory_mask is None:
                memory_mask = torch.ones(memory.shape[:2], dtype=torch.long, device=memory.device)
        else:
            trunk, memory, memory_mask = self._fused_trunk(
                pixel_values, input_ids, attention_mask, image_embeds, hidden, attentions
            )
        batch_size, num_answers = memory.shape[0], decoder_input_ids.shape[0]
        index = self._answer_index(batch_size, num_answers, answer_question_index, answers_per_question, memory.device)
        decoded = self._decoder_output(
            decoder_input_ids,
            decoder_attention_mask,
            memory[index],
            memory_mask[index],
            hidden,
            attentions,
            past_key_values,
            use_cache,
        )
        logits = decoded.logits
        loss = loss_per_answer = None
        if labels is not None:
            loss_per_answer = _sequence_nll(logits, labels)
            if answer_weights is None:
                weights = torch.ones_like(loss_per_answer)
            else:
                weights = torch.as_tensor(answer_weights, dtype=loss_per_answer.dtype, device=loss_per_answer.device)
                if weights.shape != loss_per_answer.shape:
                    raise ValueError(f"`answer_weights` must have shape ({num_answers},), got {tuple(weights.shape)}.")
            loss = (weights * loss_per_answer).sum() / batch_size
        output = MPLUGDecoderOutput(
            loss=loss,
            logits=logits,
            loss_per_sequence=loss_per_answer,
            memory=memory,
            memory_attention_mask=memory_mask,
            **(_recorded_fields(trunk) if encoder_outputs is None else {}),
            **self._decoder_recorded(decoded),
        )
        return output

    @torch.no_grad()
    def generate(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        generation_config: GenerationConfig | None = None,
        **generation_kwargs,
    ):
        r"""
        Answer questions freely. `input_ids`/`attention_mask` are the processor's question ids; the image and the
        question are encoded once, then the decoder generates from `[CLS]` until `[SEP]` with a KV cache (self- and
        cross-attention). `generation_kwargs` (`num_beams`, `max_new_tokens`, `min_new_tokens`, `do_sample`,
        `output_scores`, `return_dict_in_generate`, ...) mean what they mean in transformers. Returned sequences
        start with `[CLS]`; decode them with `processor.batch_decode`.
        """
        if input_ids is None:
            raise ValueError("`input_ids` (the question ids from the processor) is required.")
        memory, memory_mask = self._fused_memory(pixel_values, input_ids, attention_mask, image_embeds)
        return self._generate_from_memory(memory, memory_mask, None, generation_config, generation_kwargs)

    @torch.no_grad()
    def rank_answers(
        self,
        candidate_input_ids: torch.Tensor,
        candidate_attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        k: int = 128,
    ) -> MPLUGAnswerRankingOutput:
        r"""
        Closed-vocabulary answering as the original `rank_answer`: the probability of each candidate's first token
        after `[CLS]` picks `k` candidates, which are re-scored by `log p(first token) + log p(answer)` (the first
        token counts twice, as in the original) and normalised over the `k`.

        Args:
            candidate_input_ids (`torch.LongTensor` of shape `(num_candidates, length)`):
                `processor.encode_text(answer_list, add_eos=True)["input_ids"]` (`[CLS] answer [SEP]`, padded).
            candidate_attention_mask: its mask (derived from padding when absent).
            k: how many candidates to re-score (capped at the number of candidates).
        """
        if not isinstance(candidate_input_ids, torch.Tensor) or candidate_input_ids.dim() != 2:
            raise ValueError("`candidate_input_ids` must be a (num_candidates, length) tensor of answer ids.")
        if candidate_input_ids.shape[0] == 0 or candidate_input_ids.shape[1] < 2:
            raise ValueError(
                "`candidate_input_ids` must hold at least one candidate, each `[CLS]` and at least one answer token; "
                f"got shape {tuple(candidate_input_ids.shape)}."
            )
        _check_ids(candidate_input_ids, "candidate_input_ids", self.config.vocab_size)
        if candidate_attention_mask is None:
            candidate_attention_mask = (candidate_input_ids != self.config.pad_token_id).long()
            candidate_attention_mask[:, 0] = 1
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"`k` must be a positive int, got {k!r}.")
        if input_ids is None:
            raise ValueError("`input_ids` (the question ids from the processor) is required.")
        memory, memory_mask = self._fused_memory(pixel_values, input_ids, attention_mask, image_embeds)
        batch_size, num_candidates = memory.shape[0], candidate_input_ids.shape[0]
        k = min(k, num_candidates)
        device = memory.device
        candidate_input_ids = candidate_input_ids.to(device)
        candidate_attention_mask = candidate_attention_mask.to(device)

        # the memory's keys/values: computed once per question, shared by the first step and all k candidates
        shared = self._memory_cache(memory)

        def decode(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            cache = MPLUGSharedMemoryCache(DynamicCache(), shared.cross_attention_cache)
            cache.is_updated.update(shared.is_updated)
            rows = ids.shape[0]
            return self.text_decoder(
                input_ids=ids,
                attention_mask=mask,
                # only its shape is read (the keys/values come from the cache): a view, no copy per candidate
                encoder_hidden_states=memory[:1].expand(rows, -1, -1),
                encoder_attention_mask=memory_mask.repeat_interleave(rows // batch_size, 0),
                use_cache=True,
                return_dict=True,
                **{_CACHE_ARGUMENT: cache},
            ).logits

        start = candidate_input_ids[:1, :1].expand(batch_size, 1)
        first_logits = decode(start, torch.ones_like(start))[:, 0]
        first_probs = first_logits.float().softmax(dim=-1)[:, candidate_input_ids[:, 1]]
        top_probs, top_ids = first_probs.topk(k, dim=1)

        ids = candidate_input_ids[top_ids].flatten(0, 1)
        mask = candidate_attention_mask[top_ids].flatten(0, 1)
        logits = decode(ids, mask)
        nll = _sequence_nll(logits, ids.masked_fill(mask == 0, -100)).view(batch_size, k)
        scores = top_probs.log() - nll
        probabilities, order = scores.softmax(dim=-1).sort(dim=1, descending=True)
        return MPLUGAnswerRankingOutput(
            indices=top_ids.gather(1, order), probabilities=probabilities, first_token_probabilities=first_probs
        )


class MPLUGForCaptioning(MPLUGDecoderHeadMixin, MPLUGPreTrainedModel, GenerationMixin):
    r"""
    mPLUG for image (and video) captioning: the BERT decoder attends to the image features V only — as the original
    captioner, the text encoder and the cross-modal encoder are neither built nor run (`self.mplug` is a
    vision-only trunk; loading a full trunk reports their weights as unused).

    - `forward(pixel_values, labels=...)`: token-mean cross-entropy over the caption tokens (`-100` ignored, e.g.
      padding and prompt tokens).
    - `generate(pixel_values, input_ids=None, **generation_kwargs)`: `input_ids` is an optional prompt
      (`processor(text="a picture of")`, `[CLS] a picture of`); defaults: 5 beams, 8 to 25 new tokens.

    Example:
        >>> import torch
        >>> from transformers_mplug import MPLUGConfig, MPLUGForCaptioning
        >>> config = MPLUGConfig(
        ...     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        ...                        image_size=32, patch_size=16),
        ...     text_config=dict(vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        ...                      intermediate_size=64),
        ...     num_decoder_layers=1, bos_token_id=101, eos_token_id=102,
        ... )
        >>> model = MPLUGForCaptioning(config).eval()
        >>> caption = torch.tensor([[101, 7, 8, 102]])
        >>> model(pixel_values=torch.randn(1, 3, 32, 32), labels=caption).loss.shape
        torch.Size([])
        >>> model.generate(pixel_values=torch.randn(1, 3, 32, 32), num_beams=1, min_new_tokens=1, max_new_tokens=4).shape[0]
        1
    """

    def __init__(self, config: MPLUGConfig) -> None:
        super().__init__(config)
        self.mplug = MPLUGModel(config, vision_only=True)
        self.text_decoder = _share_memory_across_sequences(BertLMHeadModel(config.text_decoder_config))
        self.post_init()
        self.generation_config = self.default_generation_config(config)

    @classmethod
    def default_generation_config(cls, config: MPLUGConfig) -> GenerationConfig:
        """The original captioning decoding: 5 beams, 8 to 25 new tokens."""
        return cls._decoding_config(config, num_beams=5, min_new_tokens=8, max_new_tokens=25)

    def _memory(self, pixel_values, image_embeds, output_hidden_states=False, output_attentions=False):
        """The image features the decoder attends to, their mask, and the trunk's output (None for `image_embeds`)."""
        trunk = None
        if image_embeds is None:
            if pixel_values is None:
                raise ValueError("Pass `pixel_values` (or precomputed `image_embeds`).")
            trunk = self.mplug(
                pixel_values=pixel_values,
                output_hidden_states=output_hidden_states,
                output_attentions=output_attentions,
                return_dict=True,
            )
            image_embeds = trunk.image_embeds
        elif pixel_values is not None:
            raise ValueError("Pass either `pixel_values` or `image_embeds`, not both.")
        mask = torch.ones(image_embeds.shape[:2], dtype=torch.long, device=image_embeds.device)
        return image_embeds, mask, trunk

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        cache: Cache | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MPLUGDecoderOutput | tuple:
        r"""
        Args:
            pixel_values (`(B, C, H, W)` or video `(B, T, C, H, W)`) or image_embeds: the image(s).
            input_ids, attention_mask: decoder input `[CLS] (prompt) caption [SEP]` (derived from `labels` if absent).
            labels: the same ids with -100 where no loss is wanted (padding, prompt); loss = mean token NLL.
            cache (or past_key_values), use_cache: step-by-step decoding as in transformers: `use_cache=True`
                returns `cache`; pass it back with only the new `input_ids` (and `image_embeds=out.memory` to skip
                the vision tower; an `attention_mask`, if any, covers the cached and new tokens).
            output_hidden_states, output_attentions: the vision tower's and the decoder's hidden states / attentions.
        """
        _reject_unused_kwargs(self, kwargs)
        past_key_values, use_cache, past_length = self._cache_arguments(cache, past_key_values, use_cache)
        input_ids, attention_mask, labels = _decoder_inputs(
            labels,
            input_ids,
            attention_mask,
            self.config.pad_token_id,
            ("input_ids", "attention_mask"),
            vocab_size=self.config.vocab_size,
            past_length=past_length,
        )
        hidden, attentions = _output_flags(self.config, output_hidden_states, output_attentions)
        memory, memory_mask, trunk = self._memory(pixel_values, image_embeds, hidden, attentions)
        if memory.shape[0] != input_ids.shape[0]:
            raise ValueError(f"Batch size mismatch: {memory.shape[0]} images but {input_ids.shape[0]} captions.")
        decoded = self._decoder_output(
            input_ids, attention_mask, memory, memory_mask, hidden, attentions, past_key_values, use_cache
        )
        logits = decoded.logits
        loss = loss_per_caption = None
        if labels is not None:
            loss_per_caption = _sequence_nll(logits, labels)
            num_tokens = (labels[:, 1:] != -100).sum()
            loss = loss_per_caption.sum() / num_tokens.clamp(min=1)
        output = MPLUGDecoderOutput(
            loss=loss,
            logits=logits,
            loss_per_sequence=loss_per_caption,
            memory=memory,
            memory_attention_mask=memory_mask,
            **_recorded_fields(trunk),
            **self._decoder_recorded(decoded),
        )
        return output

    @torch.no_grad()
    def generate(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        generation_config: GenerationConfig | None = None,
        **generation_kwargs,
    ):
        r"""
        Caption images (or videos). `input_ids` is an optional prompt starting with `[CLS]` (e.g.
        `processor(text="a picture of")["input_ids"]`); all prompts of a batch must have the same length (no
        padding). The image is encoded once; the decoder uses a KV cache.
        """
        memory, memory_mask, _ = self._memory(pixel_values, image_embeds)
        if input_ids is not None:
            if input_ids.dim() != 2 or input_ids.shape[0] not in (1, memory.shape[0]):
                raise ValueError(
                    f"`input_ids` (the prompt) must have shape (1 or batch, length), got {tuple(input_ids.shape)}."
                )
            if attention_mask is not None and bool((attention_mask == 0).any()):
                raise ValueError("Prompts in one batch must have the same length (no padding); call per prompt.")
            if input_ids.shape[1] < 1 or bool((input_ids[:, 0] != self.config.bos_token_id).any()):
                raise ValueError("`input_ids` (the prompt) must start with `[CLS]` as the processor encodes it.")
            input_ids = input_ids.to(memory.device).expand(memory.shape[0], -1)
        return self._generate_from_memory(memory, memory_mask, input_ids, generation_config, generation_kwargs)


@dataclass
class MPLUGRetrievalOutput(ModelOutput):
    r"""
    Output of [`MPLUGForRetrieval.forward`]: the training losses, or (inference) the ITC logits as CLIP's.

    Args:
        loss (`torch.FloatTensor` of shape `()`): `loss_itc + loss_itm`.
        loss_itc (`torch.FloatTensor` of shape `()`): image-text contrastive loss.
        loss_itm (`torch.FloatTensor` of shape `()`): image-text matching loss over 1 positive + 2 hard negatives.
        image_features, text_features (`torch.FloatTensor` of shape `(batch_size, projection_dim)`):
            L2-normalised ITC features.
        similarity_i2t, similarity_t2i (`torch.FloatTensor` of shape `(batch_size, batch_size + queue_size)`):
            Temperature-scaled similarities used by the ITC loss.
        itm_logits (`torch.FloatTensor` of shape `(3 * batch_size, 2)`): ITM logits of [positives; negatives].
        negative_image_indices (`torch.LongTensor` of shape `(batch_size,)`): hard-negative image of each text.
        negative_text_indices (`torch.LongTensor` of shape `(batch_size,)`): hard-negative text of each image.
        logits_per_image (`torch.FloatTensor` of shape `(num_images, num_texts)`):
            Inference: ITC similarities of every image with every text divided by the temperature (as CLIP's; a
            softmax over the texts gives the zero-shot label probabilities).
        logits_per_text (`torch.FloatTensor` of shape `(num_texts, num_images)`): its transpose.
        vision_hidden_states, ..., fusion_cross_attentions (*optional*): an inference pass's recorded states, as in
            [`MPLUGModelOutput`].
    """

    loss: torch.FloatTensor | None = None
    loss_itc: torch.FloatTensor | None = None
    loss_itm: torch.FloatTensor | None = None
    logits_per_image: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    image_features: torch.FloatTensor | None = None
    text_features: torch.FloatTensor | None = None
    similarity_i2t: torch.FloatTensor | None = None
    similarity_t2i: torch.FloatTensor | None = None
    itm_logits: torch.FloatTensor | None = None
    negative_image_indices: torch.LongTensor | None = None
    negative_text_indices: torch.LongTensor | None = None
    vision_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    vision_attentions: tuple[torch.FloatTensor, ...] | None = None
    text_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    text_attentions: tuple[torch.FloatTensor, ...] | None = None
    fusion_image_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    fusion_text_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    fusion_attentions: tuple[torch.FloatTensor, ...] | None = None
    fusion_cross_attentions: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class MPLUGCorpusRetrievalOutput(ModelOutput):
    r"""
    Output of [`MPLUGForRetrieval.retrieve`].

    Args:
        similarity (`torch.FloatTensor` of shape `(num_images, num_texts)`): ITC cosine similarities.
        image_to_text_indices (`torch.LongTensor` of shape `(num_images, k)`): texts per image, best first.
        image_to_text_scores (`torch.FloatTensor` of shape `(num_images, k)`): their final scores.
        text_to_image_indices (`torch.LongTensor` of shape `(num_texts, k)`): images per text, best first.
        text_to_image_scores (`torch.FloatTensor` of shape `(num_texts, k)`): their final scores.
    """

    similarity: torch.FloatTensor | None = None
    image_to_text_indices: torch.LongTensor | None = None
    image_to_text_scores: torch.FloatTensor | None = None
    text_to_image_indices: torch.LongTensor | None = None
    text_to_image_scores: torch.FloatTensor | None = None


class MPLUGForRetrieval(MPLUGPreTrainedModel):
    r"""
    mPLUG for image-text retrieval: ITC features (`vision_proj` on the image `[CLS]`, `text_proj` on the
    text-encoder `[CLS]`, L2-normalised, learnable temperature) and an ITM head on the fused text `[CLS]`.

    - `get_image_features` / `get_text_features`: ITC features (normalised by default) in `.pooler_output`, as CLIP.
    - `match_pairs`: ITM logits of given image-text pairs (`[:, 1]` = "match").
    - `forward(...)`: training losses (ITC with optional queue / momentum features; ITM with hard negatives drawn
      from the softmaxed similarities).
    - `retrieve(...)`: corpus retrieval in both directions, ITC top-k re-ranked by ITM, in batches.

    Example:
        >>> import torch
        >>> from transformers_mplug import MPLUGConfig, MPLUGForRetrieval
        >>> config = MPLUGConfig(
        ...     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        ...                        image_size=32, patch_size=16),
        ...     text_config=dict(vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        ...                      intermediate_size=64),
        ...     num_cross_modal_layers=2, num_decoder_layers=1, projection_dim=16, bos_token_id=101, eos_token_id=102,
        ... )
        >>> model = MPLUGForRetrieval(config).eval()
        >>> images, texts = torch.randn(3, 3, 32, 32), torch.randint(3, 100, (4, 5))
        >>> model.get_image_features(pixel_values=images).pooler_output.shape
        torch.Size([3, 16])
        >>> result = model.retrieve(pixel_values=images, input_ids=texts, k=2)
        >>> result.image_to_text_indices.shape, result.text_to_image_indices.shape
        (torch.Size([3, 2]), torch.Size([4, 2]))
    """

    def __init__(self, config: MPLUGConfig) -> None:
        super().__init__(config)
        self._build_retrieval_modules(config)
        self.post_init()

    def _build_retrieval_modules(self, config: MPLUGConfig) -> None:
        self.mplug = MPLUGModel(config)
        hidden = config.hidden_size
        self.vision_proj = nn.Linear(hidden, config.projection_dim)
        self.text_proj = nn.Linear(hidden, config.projection_dim)
        self.itm_head = nn.Linear(hidden, 2)
        # shape (1,), not (): DeepSpeed cannot broadcast 0-dim parameters
        self.temp = nn.Parameter(torch.full((1,), config.itc_temperature))

    def get_input_embeddings(self) -> nn.Module:
        return self.mplug.get_input_embeddings()

    # ------------------------------------------------------------------------------------------- features
    def _image_embeds(self, pixel_values, image_embeds) -> torch.Tensor:
        if image_embeds is not None:
            if pixel_values is not None:
                raise ValueError("Pass either `pixel_values` or `image_embeds`, not both.")
            return image_embeds
        if pixel_values is None:
            raise ValueError("Pass `pixel_values` (or precomputed `image_embeds`).")
        return self.mplug.encode_image(pixel_values)[1]

    def _image_features(
        self,
        embeds: torch.Tensor,
        normalize: bool = True,
        frame_pooling: str = "first",
        num_frames: int | None = None,
    ) -> torch.Tensor:
        """ITC image features `(B, projection_dim)` of image tokens `embeds` (see [`get_image_features`])."""
        if frame_pooling == "first":
            features = self.vision_proj(embeds[:, 0])
        elif frame_pooling == "mean":
            if not isinstance(num_frames, int) or num_frames < 1 or embeds.shape[1] % num_frames:
                raise ValueError(
                    f"`frame_pooling='mean'` needs video `pixel_values` (B, T, C, H, W) or `num_frames` dividing the "
                    f"{embeds.shape[1]} tokens of `image_embeds`, got num_frames={num_frames!r}."
                )
            tokens_per_frame = embeds.shape[1] // num_frames
            features = self.vision_proj(embeds[:, ::tokens_per_frame]).mean(dim=1)
        else:
            raise ValueError(f"`frame_pooling` must be 'first' or 'mean', got {frame_pooling!r}.")
        return nn.functional.normalize(features, dim=-1) if normalize else features

    def _text_features(self, text_embeds: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """ITC text features `(B, projection_dim)` of text-encoder states (see [`get_text_features`])."""
        features = self.text_proj(text_embeds[:, 0])
        return nn.functional.normalize(features, dim=-1) if normalize else features

    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        normalize: bool = True,
        frame_pooling: str = "first",
        num_frames: int | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPooling | tuple:
        """The image side of ITC, as CLIP's `get_image_features`: a `BaseModelOutputWithPooling` whose
        `pooler_output` `(B, projection_dim)` is `vision_proj` of the image `[CLS]` (L2-normalised unless
        `normalize=False`), `last_hidden_state` the image tokens V, and `hidden_states` / `attentions` the vision
        tower's when asked. Videos `(B, T, C, H, W)` (or `image_embeds` of `num_frames` concatenated frames) use the
        first frame's `[CLS]` with `frame_pooling="first"` (the original), or the mean of every frame's projected
        `[CLS]` with `frame_pooling="mean"` (zero-shot video retrieval from an image checkpoint).

        Changed in 0.2: it returned the feature tensor, now `.pooler_output` (transformers v5's convention)."""
        _reject_unused_kwargs(self, kwargs)
        hidden, attentions = _output_flags(self.config, output_hidden_states, output_attentions)
        encoded = None
        if image_embeds is None:
            if pixel_values is None:
                raise ValueError("Pass `pixel_values` (or precomputed `image_embeds`).")
            encoded = self.mplug.encode_separately(
                pixel_values=pixel_values, output_hidden_states=hidden, output_attentions=attentions
            )
            embeds = encoded.image_embeds
        elif pixel_values is not None:
            raise ValueError("Pass either `pixel_values` or `image_embeds`, not both.")
        elif hidden or attentions:
            raise ValueError("`output_hidden_states`/`output_attentions` record the vision tower: pass `pixel_values`.")
        else:
            embeds = image_embeds
        if frame_pooling == "mean" and pixel_values is not None and pixel_values.dim() == 5:
            num_frames = pixel_values.shape[1]
        return BaseModelOutputWithPooling(
            last_hidden_state=embeds,
            pooler_output=self._image_features(embeds, normalize, frame_pooling, num_frames),
            hidden_states=None if encoded is None else encoded.vision_hidden_states,
            attentions=None if encoded is None else encoded.vision_attentions,
        )

    @can_return_tuple
    def get_text_features(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        text_embeds: torch.Tensor | None = None,
        normalize: bool = True,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPooling | tuple:
        """The text side of ITC, as CLIP's `get_text_features`: `pooler_output` `(B, projection_dim)` is `text_proj`
        of the text-encoder `[CLS]` (L2-normalised unless `normalize=False`), `last_hidden_state` the text states T,
        `hidden_states` / `attentions` the text encoder's when asked.

        Changed in 0.2: it returned the feature tensor, now `.pooler_output` (transformers v5's convention)."""
        _reject_unused_kwargs(self, kwargs)
        hidden, attentions = _output_flags(self.config, output_hidden_states, output_attentions)
        encoded = None
        if text_embeds is None:
            if input_ids is None:
                raise ValueError("Pass `input_ids` (or precomputed `text_embeds`).")
            encoded = self.mplug.encode_separately(
                input_ids=input_ids,
                attention_mask=attention_mask,
                output_hidden_states=hidden,
                output_attentions=attentions,
            )
            text_embeds = encoded.text_embeds
        elif input_ids is not None:
            raise ValueError("Pass either `input_ids` or `text_embeds`, not both.")
        elif hidden or attentions:
            raise ValueError("`output_hidden_states`/`output_attentions` record the text encoder: pass `input_ids`.")
        return BaseModelOutputWithPooling(
            last_hidden_state=text_embeds,
            pooler_output=self._text_features(text_embeds, normalize),
            hidden_states=None if encoded is None else encoded.text_hidden_states,
            attentions=None if encoded is None else encoded.text_attentions,
        )

    def _itm_logits(
        self,
        image_embeds: torch.Tensor,
        text_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        image_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        _, fused_text = self.mplug.cross_modal_encoder(image_embeds, text_embeds, attention_mask, image_index)
        return self.itm_head(fused_text[:, 0])

    def match_pairs(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """ITM logits `(B, 2)` of the pairs (image `b`, text `b`); `[:, 1]` is the match logit, the original's
        retrieval score; `.softmax(-1)[:, 1]` a match probability."""
        out = self.mplug(
            pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask, image_embeds=image_embeds
        )
        return self.itm_head(out.fused_text_embeds[:, 0])

    # ------------------------------------------------------------------------------------------- losses
    def itc_loss(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        idx: torch.Tensor | None = None,
        image_features_m: torch.Tensor | None = None,
        text_features_m: torch.Tensor | None = None,
        image_queue: torch.Tensor | None = None,
        text_queue: torch.Tensor | None = None,
        idx_queue: torch.Tensor | None = None,
        alpha: float = 0.0,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        r"""
        Image-text contrastive loss as the original: similarities of the (normalised) features against the batch
        keys + queue, divided by the temperature; targets = texts/images with the same `idx` (uniform), mixed with
        the momentum model's softmaxed similarities by `alpha` when momentum features are given.

        Args:
            image_features, text_features: `(B, D)` normalised features (`get_*_features`).
            idx: `(B,)` image ids (equal ids are positives); default: each pair is its own id.
            image_features_m, text_features_m: `(B, D)` momentum-model features used as the batch keys (default:
                the features themselves, detached from nothing).
            image_queue, text_queue: `(D, Q)` queued keys; idx_queue: `(1, Q)` their ids (-100 = empty).
            alpha: weight of the momentum distillation targets.

        Returns `(loss, similarity_i2t, similarity_t2i)`.
        """
        batch_size = image_features.shape[0]
        if text_features.shape[0] != batch_size:
            raise ValueError("`image_features` and `text_features` must have the same batch size.")
        if idx is None:
            idx = torch.arange(batch_size, device=image_features.device)
        idx = idx.view(-1, 1)
        if (image_queue is None) != (text_queue is None):
            raise ValueError("Pass both `image_queue` and `text_queue`, or neither.")
        keys_image = image_features if image_features_m is None else image_features_m
        keys_text = text_features if text_features_m is None else text_features_m
        idx_all = idx.t()
        image_all, text_all = keys_image.t(), keys_text.t()
        if image_queue is not None:
            if idx_queue is None:
                raise ValueError("`idx_queue` is needed with the queues (use -100 for entries of no image).")
            image_all = torch.cat([image_all, image_queue.detach()], dim=1)
            text_all = torch.cat([text_all, text_queue.detach()], dim=1)
            idx_all = torch.cat([idx_all, idx_queue.view(1, -1).to(idx.device)], dim=1)
        positives = torch.eq(idx, idx_all).float()
        targets = positives / positives.sum(1, keepdim=True)
        temperature = self.temp
        similarity_i2t = image_features @ text_all / temperature
        similarity_t2i = text_features @ image_all / temperature
        targets_i2t = targets_t2i = targets
        if alpha > 0 and image_features_m is not None and text_features_m is not None:
            with torch.no_grad():
                targets_i2t = alpha * (image_features_m @ text_all / temperature).softmax(1) + (1 - alpha) * targets
                targets_t2i = alpha * (text_features_m @ image_all / temperature).softmax(1) + (1 - alpha) * targets
        loss_i2t = -(similarity_i2t.log_softmax(1) * targets_i2t).sum(1).mean()
        loss_t2i = -(similarity_t2i.log_softmax(1) * targets_t2i).sum(1).mean()
        return (loss_i2t + loss_t2i) / 2, similarity_i2t, similarity_t2i

    def itm_loss(
        self,
        image_embeds: torch.Tensor,
        text_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        similarity_i2t: torch.Tensor,
        similarity_t2i: torch.Tensor,
        idx: torch.Tensor | None = None,
        negative_image_indices: torch.Tensor | None = None,
        negative_text_indices: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        r"""
        Image-text matching loss with hard negatives, as the original: for each text a negative image and for each
        image a negative text are drawn (`torch.multinomial`, global RNG, texts first) from the softmaxed in-batch
        similarities with same-`idx` pairs excluded; cross-entropy over [B positives; 2B negatives].
        Pass `negative_*_indices` to use given negatives instead of drawing.

        Returns `(loss, itm_logits, negative_image_indices, negative_text_indices)`.
        """
        batch_size = image_embeds.shape[0]
        if idx is None:
            idx = torch.arange(batch_size, device=image_embeds.device)
        idx = idx.view(-1, 1)
        with torch.no_grad():
            same = torch.eq(idx, idx.t())
            weights_i2t = similarity_i2t[:, :batch_size].float().softmax(1).masked_fill(same, 0)
            weights_t2i = similarity_t2i[:, :batch_size].float().softmax(1).masked_fill(same, 0)
            if bool((weights_i2t.sum(1) == 0).any()) and (
                negative_image_indices is None or negative_text_indices is None
            ):
                raise ValueError("Every sample shares its `idx` with the whole batch: no hard negative exists.")
            if negative_image_indices is None:
                negative_image_indices = torch.cat([torch.multinomial(w, 1) for w in weights_t2i])
            if negative_text_indices is None:
                negative_text_indices = torch.cat([torch.multinomial(w, 1) for w in weights_i2t])
        negative_image_indices = negative_image_indices.to(image_embeds.device).long()
        negative_text_indices = negative_text_indices.to(image_embeds.device).long()
        text_all = torch.cat([text_embeds, text_embeds[negative_text_indices]], dim=0)
        mask_all = torch.cat([attention_mask, attention_mask[negative_text_indices]], dim=0)
        image_all = torch.cat([image_embeds[negative_image_indices], image_embeds], dim=0)
        logits = torch.cat(
            [
                self._itm_logits(image_embeds, text_embeds, attention_mask),
                self._itm_logits(image_all, text_all, mask_all),
            ]
        )
        labels = torch.cat(
            [torch.ones(batch_size, dtype=torch.long), torch.zeros(2 * batch_size, dtype=torch.long)]
        ).to(logits.device)
        return nn.functional.cross_entropy(logits, labels), logits, negative_image_indices, negative_text_indices

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        idx: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        image_features_m: torch.Tensor | None = None,
        text_features_m: torch.Tensor | None = None,
        image_queue: torch.Tensor | None = None,
        text_queue: torch.Tensor | None = None,
        idx_queue: torch.Tensor | None = None,
        alpha: float = 0.0,
        negative_image_indices: torch.Tensor | None = None,
        negative_text_indices: torch.Tensor | None = None,
        return_loss: bool | None = None,
        use_itm_head: bool = False,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MPLUGRetrievalOutput | tuple:
        r"""
        Two uses, as CLIP's and BLIP's retrieval models:

        - **Inference** (`return_loss=False`, or `None` in eval mode without training arguments): `logits_per_image`
          `(num_images, num_texts)` and `logits_per_text`, the ITC similarities of every image with every text over
          the temperature, with the normalised `image_features`/`text_features`; transformers'
          `zero-shot-image-classification` pipeline reads them. With `use_itm_head=True`, `itm_logits` `(B, 2)`
          are the ITM logits of the pairs (image `b`, text `b`) (`[:, 1]` = match), as [`match_pairs`].
        - **Training** (`return_loss=True`, or `None` in training mode or with any of `idx`, the momentum/queue
          arguments or the negatives): the original fine-tuning step, `loss = loss_itc + loss_itm`. See
          [`itc_loss`] and [`itm_loss`] for those arguments.

        `output_hidden_states` / `output_attentions` (inference) add the stages' recorded states (see
        [`MPLUGModelOutput`]): vision and text for the ITC logits, every stage for `use_itm_head=True`. The training
        step runs several fused passes (positives, then hard negatives) and does not record them.
        """
        _reject_unused_kwargs(self, kwargs)
        if input_ids is None:
            raise ValueError("`input_ids` (the captions from the processor) is required.")
        attention_mask = _text_attention_mask(input_ids, attention_mask, self.config.pad_token_id)
        hidden, attentions = _output_flags(self.config, output_hidden_states, output_attentions)
        training_arguments = (
            idx,
            image_features_m,
            text_features_m,
            image_queue,
            text_queue,
            idx_queue,
            negative_image_indices,
            negative_text_indices,
        )
        if return_loss is None:
            return_loss = self.training or any(argument is not None for argument in training_arguments)
        if not return_loss:
            if any(argument is not None for argument in training_arguments):
                raise ValueError("`return_loss=False` (inference) takes no training arguments (`idx`, queues, ...).")
            output = self._inference_logits(
                pixel_values, image_embeds, input_ids, attention_mask, use_itm_head, hidden, attentions
            )
            return output
        if use_itm_head:
            raise ValueError("`use_itm_head=True` is an inference option; pass `return_loss=False` with it.")
        if hidden or attentions:
            raise ValueError(
                "`output_hidden_states`/`output_attentions` record an inference pass (`return_loss=False`); the "
                "training step runs several fused passes and does not record them."
            )
        image_embeds = self._image_embeds(pixel_values, image_embeds)
        if image_embeds.shape[0] != input_ids.shape[0]:
            raise ValueError(f"Batch size mismatch: {image_embeds.shape[0]} images but {input_ids.shape[0]} texts.")
        if input_ids.shape[0] < 2:
            raise ValueError("Retrieval training needs a batch of at least 2 pairs (hard negatives come from it).")
        text_embeds = self.mplug.encode_text(input_ids, attention_mask)
        image_features = self._image_features(image_embeds)
        text_features = self._text_features(text_embeds)
        loss_itc, sim_i2t, sim_t2i = self.itc_loss(
            image_features,
            text_features,
            idx,
            image_features_m,
            text_features_m,
            image_queue,
            text_queue,
            idx_queue,
            alpha,
        )
        loss_itm, itm_logits, neg_images, neg_texts = self.itm_loss(
            image_embeds,
            text_embeds,
            attention_mask,
            sim_i2t,
            sim_t2i,
            idx,
            negative_image_indices,
            negative_text_indices,
        )
        output = MPLUGRetrievalOutput(
            loss=loss_itc + loss_itm,
            loss_itc=loss_itc,
            loss_itm=loss_itm,
            image_features=image_features,
            text_features=text_features,
            similarity_i2t=sim_i2t,
            similarity_t2i=sim_t2i,
            itm_logits=itm_logits,
            negative_image_indices=neg_images,
            negative_text_indices=neg_texts,
        )
        return output

    def _inference_logits(
        self,
        pixel_values: torch.Tensor | None,
        image_embeds: torch.Tensor | None,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        use_itm_head: bool,
        output_hidden_states: bool,
        output_attentions: bool,
    ) -> MPLUGRetrievalOutput:
        if use_itm_head:
            num_images = (pixel_values if image_embeds is None else image_embeds).shape[0]
            if num_images != input_ids.shape[0]:
                raise ValueError(
                    f"`use_itm_head=True` scores pairs (image b, text b): got {num_images} images and "
                    f"{input_ids.shape[0]} texts; repeat them into pairs, or use `retrieve` for a gallery."
                )
            trunk = self.mplug(
                pixel_values=pixel_values,
                input_ids=input_ids,
                attention_mask=attention_mask,
                image_embeds=image_embeds,
                output_hidden_states=output_hidden_states,
                output_attentions=output_attentions,
                return_dict=True,
            )
            itm_logits = self.itm_head(trunk.fused_text_embeds[:, 0])
            return MPLUGRetrievalOutput(itm_logits=itm_logits, **_recorded_fields(trunk))

        encoded = self.mplug.encode_separately(
            pixel_values, input_ids, attention_mask, image_embeds, output_hidden_states, output_attentions
        )
        recorded = _recorded_fields(encoded)
        image_features = self._image_features(encoded.image_embeds)
        text_features = self._text_features(encoded.text_embeds)
        logits_per_image = image_features @ text_features.t() / self.temp
        return MPLUGRetrievalOutput(
            logits_per_image=logits_per_image,
            logits_per_text=logits_per_image.t(),
            image_features=image_features,
            text_features=text_features,
            **recorded,
        )

    # ------------------------------------------------------------------------------------------- corpus retrieval
    @torch.no_grad()
    def retrieve(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        k: int = 256,
        add_itc_score: bool = False,
        batch_size: int = 64,
        frame_pooling: str = "first",
        distributed: bool = False,
    ) -> MPLUGCorpusRetrievalOutput:
        r"""
        Retrieve in both directions over a gallery of images and texts, as the original evaluation: ITC
        similarities pick the top `k` candidates per query, which are re-ranked by the ITM match logit (plus the ITC
        similarity with `add_itc_score=True`, as the original video retrieval). Images, texts and the
        `(num_images + num_texts) * k` candidate pairs are processed in batches of `batch_size`; no all-pairs
        fusion pass is made. Videos `(B, T, C, H, W)` are galleries of concatenated frame tokens (ITM reads all of
        them); `frame_pooling="mean"` averages the frames' projected `[CLS]` for the ITC features (zero-shot
        text-to-video retrieval: `frame_pooling="mean", add_itc_score=True`).

        With `distributed=True` in a process group of several ranks (e.g. under `accelerate launch
        --num_processes N`), every rank encodes its contiguous share of the images and texts and re-ranks its share of
        the candidate pairs (grouped by image as on one process); the shares are gathered, so every rank returns the
        whole output, equal to one process's. Every rank must call it with the same gallery and arguments.
        """
        if input_ids is None:
            raise ValueError("`input_ids` (the text gallery) is required.")
        if input_ids.dim() != 2 or input_ids.shape[0] == 0:
            raise ValueError(f"`input_ids` must hold at least one text (batch, length), got {tuple(input_ids.shape)}.")
        gallery = image_embeds if image_embeds is not None else pixel_values
        if isinstance(gallery, torch.Tensor) and gallery.shape[0] == 0:
            raise ValueError("The image gallery is empty: pass at least one image (`pixel_values` / `image_embeds`).")
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"`k` must be a positive int, got {k!r}.")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive int, got {batch_size!r}.")
        if not isinstance(distributed, bool):
            raise TypeError(f"`distributed` must be a bool, got {type(distributed).__name__}.")
        attention_mask = _text_attention_mask(input_ids, attention_mask, self.config.pad_token_id)
        if distributed:  # the process-group calls live in training.py
            from .training import gather_rows_across_ranks, rank_and_world_size, shard_bounds

            rank, world_size = rank_and_world_size()
        else:
            rank, world_size = 0, 1

        def share(count: int) -> slice:
            return slice(*shard_bounds(count, rank, world_size)) if world_size > 1 else slice(0, count)

        def gathered(rows: torch.Tensor) -> torch.Tensor:
            return gather_rows_across_ranks(rows) if world_size > 1 else rows

        def encoded(encode, *tensors: torch.Tensor) -> torch.Tensor:
            """`encode` over this rank's share of the rows, in batches, then every rank's share."""
            local = [t[share(t.shape[0])] for t in tensors]
            if local[0].shape[0] == 0:  # a rank with no share (fewer items than ranks): one row gives the shape
                out = encode(*(t[:1] for t in tensors))[:0]
            else:
                out = torch.cat([encode(*chunks) for chunks in zip(*(t.split(batch_size) for t in local))], dim=0)
            return gathered(out)

        num_frames = None
        if image_embeds is None:
            if pixel_values is None:
                raise ValueError("Pass `pixel_values` (or precomputed `image_embeds`) for the image gallery.")
            num_frames = pixel_values.shape[1] if pixel_values.dim() == 5 else None
            image_embeds = encoded(lambda chunk: self.mplug.encode_image(chunk)[1], pixel_values)
        elif frame_pooling != "first":
            raise ValueError("`frame_pooling='mean'` needs video `pixel_values` (the frame count), not `image_embeds`.")
        text_embeds = encoded(self.mplug.encode_text, input_ids, attention_mask)
        attention_mask = attention_mask.to(text_embeds.device)
        image_features = self._image_features(image_embeds, frame_pooling=frame_pooling, num_frames=num_frames)
        similarity = image_features @ self._text_features(text_embeds).t()
        num_images, num_texts = similarity.shape

        def rerank(query_count: int, candidates: torch.Tensor, pair_images, pair_texts, itc):
            scores = torch.empty(candidates.numel(), device=similarity.device, dtype=similarity.dtype)
            flat_images, flat_texts = pair_images.reshape(-1), pair_texts.reshape(-1)
            # pairs grouped by image: each batch projects its few images to cross-attention keys/values once
            by_image = flat_images.argsort(stable=True)
            mine = by_image[share(by_image.numel())]  # this rank's share of the grouped pairs
            local = scores.new_empty(mine.numel())
            for start in range(0, mine.numel(), batch_size):
                rows = mine[start : start + batch_size]
                images, index = flat_images[rows].unique(return_inverse=True)
                t = flat_texts[rows]
                logits = self._itm_logits(image_embeds[images], text_embeds[t], attention_mask[t], image_index=index)
                local[start : start + rows.numel()] = logits[:, 1].to(scores.dtype)
            scores[by_image] = gathered(local)
            scores = scores.view(query_count, -1)
            if add_itc_score:
                scores = scores + itc
            order = scores.argsort(dim=1, descending=True)
            return candidates.gather(1, order), scores.gather(1, order)

        k_texts = min(k, num_texts)
        itc_i2t, cand_texts = similarity.topk(k_texts, dim=1)
        image_rows = torch.arange(num_images, device=similarity.device)[:, None].expand(-1, k_texts)
        i2t_indices, i2t_scores = rerank(num_images, cand_texts, image_rows, cand_texts, itc_i2t)

        k_images = min(k, num_images)
        itc_t2i, cand_images = similarity.t().topk(k_images, dim=1)
        text_rows = torch.arange(num_texts, device=similarity.device)[:, None].expand(-1, k_images)
        t2i_indices, t2i_scores = rerank(num_texts, cand_images, cand_images, text_rows, itc_t2i)
        return MPLUGCorpusRetrievalOutput(
            similarity=similarity,
            image_to_text_indices=i2t_indices,
            image_to_text_scores=i2t_scores,
            text_to_image_indices=t2i_indices,
            text_to_image_scores=t2i_scores,
        )


def box_cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """(cx, cy, w, h) -> (x1, y1, x2, y2)."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def generalized_box_iou_pairs(boxes1: torch.Tensor, boxes2: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """GIoU of matching rows of two `(N, 4)` xyxy box sets (the original's formula, with its 1e-5 guards)."""
    area1 = (boxes1[:, 2] - boxes1[:, 0]) * (boxes1[:, 3] - boxes1[:, 1])
    area2 = (boxes2[:, 2] - boxes2[:, 0]) * (boxes2[:, 3] - boxes2[:, 1])
    inter_wh = (torch.min(boxes1[:, 2:], boxes2[:, 2:]) - torch.max(boxes1[:, :2], boxes2[:, :2])).clamp(min=0)
    inter = inter_wh[:, 0] * inter_wh[:, 1]
    union = area1 + area2 - inter
    iou = inter / (union + eps)
    hull_wh = (torch.max(boxes1[:, 2:], boxes2[:, 2:]) - torch.min(boxes1[:, :2], boxes2[:, :2])).clamp(min=0)
    hull = hull_wh[:, 0] * hull_wh[:, 1]
    return iou - (hull - union) / (hull + eps)


@dataclass
class MPLUGGroundingOutput(ModelOutput):
    r"""
    Output of [`MPLUGForGrounding`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*): the original weighted token loss (training forward).
        logits (`torch.FloatTensor` of shape `(batch_size, steps, vocab_size)`):
            Decoder scores with every non-coordinate id masked (-10000 added). Training forward: all 5 positions of
            `[prefix, 4 target tokens]`; prediction: the logits of each of the 4 decoding steps.
        pred_boxes (`torch.FloatTensor` of shape `(batch_size, 4)`): normalised `(cx, cy, w, h)` on the padded square.
        pred_tokens (`torch.LongTensor` of shape `(batch_size, 4)`): the chosen coordinate tokens.
        scores (`torch.FloatTensor` of shape `(batch_size,)`, *optional*):
            Joint probability of the 4 chosen tokens (prediction only).
        token_loss (`torch.FloatTensor` of shape `(batch_size, 4)`, *optional*): unweighted token cross-entropy.
        vision_hidden_states, ..., decoder_cross_attentions (*optional*): the teacher-forced pass's recorded states,
            as in [`MPLUGDecoderOutput`].
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    pred_boxes: torch.FloatTensor | None = None
    pred_tokens: torch.LongTensor | None = None
    scores: torch.FloatTensor | None = None
    token_loss: torch.FloatTensor | None = None
    vision_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    vision_attentions: tuple[torch.FloatTensor, ...] | None = None
    text_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    text_attentions: tuple[torch.FloatTensor, ...] | None = None
    fusion_image_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    fusion_text_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    fusion_attentions: tuple[torch.FloatTensor, ...] | None = None
    fusion_cross_attentions: tuple[torch.FloatTensor, ...] | None = None
    decoder_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    decoder_attentions: tuple[torch.FloatTensor, ...] | None = None
    decoder_cross_attentions: tuple[torch.FloatTensor, ...] | None = None


class MPLUGForGrounding(MPLUGDecoderHeadMixin, MPLUGPreTrainedModel):
    r"""
    mPLUG for visual grounding (referring expressions): the decoder over `concat(V', T')` writes 4 coordinate tokens
    `(cx, cy, w, h)` after a prefix token, with every non-coordinate logit masked. A coordinate `v` in [0, 1] is bin
    `floor(v * (num_coordinate_bins - 1))`, token `coordinate_token_start_id + bin` (337 bins, `[unused340]`...).

    - `forward(..., boxes=...)`: the original training loss: token cross-entropy weighted by the clamped L1 error and
      by `1 - GIoU` of the teacher-forced argmax box. `config.grounding_loss_weighting="original"` (default) keeps the
      original's batch broadcast (every sample's loss times every sample's weights, averaged); `"per_box"` weights
      each box's tokens by its own errors.
    - `predict_boxes(...)`: 4 greedy constrained steps (KV cache); boxes normalised to the padded square image
      (`processor.post_process_grounding` turns them into pixels).

    Example:
        >>> import torch
        >>> from transformers_mplug import MPLUGConfig, MPLUGForGrounding
        >>> config = MPLUGConfig(
        ...     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        ...                        image_size=32, patch_size=16),
        ...     text_config=dict(vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        ...                      intermediate_size=64),
        ...     num_cross_modal_layers=2, num_decoder_layers=1, bos_token_id=1, eos_token_id=2,
        ...     grounding_prefix_token_id=10, coordinate_token_start_id=11, num_coordinate_bins=17,
        ... )
        >>> model = MPLUGForGrounding(config).eval()
        >>> out = model.predict_boxes(pixel_values=torch.randn(1, 3, 32, 32), input_ids=torch.tensor([[1, 5, 6, 2]]))
        >>> out.pred_boxes.shape, bool(((out.pred_tokens >= 11) & (out.pred_tokens < 28)).all())
        (torch.Size([1, 4]), True)
    """

    def __init__(self, config: MPLUGConfig) -> None:
        super().__init__(config)
        vocab = config.vocab_size
        start, bins, prefix = (
            config.coordinate_token_start_id,
            config.num_coordinate_bins,
            config.grounding_prefix_token_id,
        )
        if not (0 <= prefix < vocab and 0 <= start and start + bins <= vocab):
            raise ValueError(
                f"Grounding tokens out of the vocabulary ({vocab}): prefix {prefix}, coordinate ids "
                f"[{start}, {start + bins}); set `grounding_prefix_token_id` / `coordinate_token_start_id` / "
                "`num_coordinate_bins`."
            )
        if start <= prefix < start + bins:
            raise ValueError("`grounding_prefix_token_id` must not be a coordinate token.")
        self.mplug = MPLUGModel(config)
        self.text_decoder = _share_memory_across_sequences(BertLMHeadModel(config.text_decoder_config))
        self.post_init()

    def _coordinate_mask(self, logits: torch.Tensor) -> torch.Tensor:
        mask = torch.full((logits.shape[-1],), -10000.0, dtype=logits.dtype, device=logits.device)
        start = self.config.coordinate_token_start_id
        mask[start : start + self.config.num_coordinate_bins] = 0.0
        return mask

    def boxes_to_tokens(self, boxes: torch.Tensor) -> torch.Tensor:
        """Normalised `(cx, cy, w, h)` -> coordinate token ids (`floor(clamp(v, 0, 1) * (bins - 1)) + start`)."""
        return boxes_to_coordinate_tokens(boxes, self.config.coordinate_token_start_id, self.config.num_coordinate_bins)

    def tokens_to_boxes(self, tokens: torch.Tensor) -> torch.Tensor:
        """Coordinate token ids -> normalised `(cx, cy, w, h)`."""
        return coordinate_tokens_to_boxes(
            tokens, self.config.coordinate_token_start_id, self.config.num_coordinate_bins
        )

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MPLUGGroundingOutput | tuple:
        r"""
        Args:
            pixel_values, input_ids, attention_mask, image_embeds: image and phrase (grounding phrases are encoded
                `[CLS] phrase [SEP]` as the original dataset code does: `processor.encode_phrases`).
            boxes (`torch.FloatTensor` of shape `(batch_size, 4)`): target `(cx, cy, w, h)` normalised to the padded
                square image. With boxes: teacher-forced loss; without: same as [`predict_boxes`].
            output_hidden_states, output_attentions: every stage's hidden states / attentions of the teacher-forced
                pass (with `boxes`; the constrained decoding of [`predict_boxes`] is not recorded).
        """
        _reject_unused_kwargs(self, kwargs)
        hidden, attentions = _output_flags(self.config, output_hidden_states, output_attentions)
        if boxes is None:
            if hidden or attentions:
                raise ValueError(
                    "`output_hidden_states`/`output_attentions` record the teacher-forced pass: pass `boxes` (e.g. the "
                    "predicted ones, `predict_boxes(...).pred_boxes`)."
                )
            output = self.predict_boxes(pixel_values, input_ids, attention_mask, image_embeds)
            return output
        trunk, memory, memory_mask = self._fused_trunk(
            pixel_values, input_ids, attention_mask, image_embeds, hidden, attentions
        )
        batch_size = memory.shape[0]
        boxes = torch.as_tensor(boxes, dtype=memory.dtype, device=memory.device)
        if boxes.shape != (batch_size, 4):
            raise ValueError(f"`boxes` must have shape ({batch_size}, 4) (cx, cy, w, h), got {tuple(boxes.shape)}.")
        if not bool(torch.isfinite(boxes).all()) or bool((boxes < 0).any()) or bool((boxes > 1).any()):
            raise ValueError(
                "`boxes` must be normalised (cx, cy, w, h) in [0, 1] on the padded square image, got values in "
                f"[{float(boxes.min()):.3g}, {float(boxes.max()):.3g}]; convert pixel (x1, y1, x2, y2) boxes with "
                "`processor.prepare_grounding(images, phrases, boxes=...)` or `processor.box_pixels_to_normalized`."
            )
        prefix = torch.full((batch_size, 1), self.config.grounding_prefix_token_id, device=memory.device)
        decoder_ids = torch.cat([prefix, self.boxes_to_tokens(boxes)], dim=1)
        decoded = self._decoder_output(
            decoder_ids, torch.ones_like(decoder_ids), memory, memory_mask, hidden, attentions
        )
        logits = decoded.logits + self._coordinate_mask(decoded.logits)
        token_loss = nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]), decoder_ids[:, 1:].reshape(-1), reduction="none"
        ).view(batch_size, 4)
        with torch.no_grad():
            pred_tokens = logits[:, :-1].argmax(-1)
            pred_boxes = self.tokens_to_boxes(pred_tokens)
            weight_l1 = (pred_boxes - boxes).abs().clamp(0, 5)
            weight_giou = 1 - generalized_box_iou_pairs(box_cxcywh_to_xyxy(pred_boxes), box_cxcywh_to_xyxy(boxes))
        if self.config.grounding_loss_weighting == "original":
            # the original multiplies a (B, 1, 4) loss by (B, 4) and (B, 1) weights: a (B, B, 4) broadcast that pairs
            # every sample's token loss with every sample's weights; kept for parity with released training runs
            loss = (token_loss[:, None, :] * (weight_l1 * weight_giou[:, None])[None, :, :]).mean()
        else:
            loss = (token_loss * weight_l1 * weight_giou[:, None]).mean()
        output = MPLUGGroundingOutput(
            loss=loss,
            logits=logits,
            pred_boxes=pred_boxes,
            pred_tokens=pred_tokens,
            token_loss=token_loss,
            **_recorded_fields(trunk),
            **self._decoder_recorded(decoded),
        )
        return output

    @torch.no_grad()
    def predict_boxes(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
    ) -> MPLUGGroundingOutput:
        """Predict one box per (image, phrase): 4 greedy steps over the coordinate tokens, with a KV cache."""
        if input_ids is None:
            raise ValueError("`input_ids` (the phrase ids) is required.")
        memory, memory_mask = self._fused_memory(pixel_values, input_ids, attention_mask, image_embeds)
        batch_size = memory.shape[0]
        tokens = torch.full((batch_size, 1), self.config.grounding_prefix_token_id, device=memory.device)
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        step_logits, step_probs, step_input = [], [], tokens
        for _ in range(4):
            logits = self.text_decoder(
                input_ids=step_input,
                attention_mask=torch.ones_like(tokens),
                encoder_hidden_states=memory,
                encoder_attention_mask=memory_mask,
                use_cache=True,
                return_dict=True,
                **{_CACHE_ARGUMENT: cache},
            ).logits[:, -1]
            logits = logits + self._coordinate_mask(logits)
            step_input = logits.argmax(-1, keepdim=True)
            step_probs.append(logits.float().softmax(-1).gather(1, step_input)[:, 0])
            step_logits.append(logits)
            tokens = torch.cat([tokens, step_input], dim=1)
        pred_tokens = tokens[:, 1:]
        return MPLUGGroundingOutput(
            logits=torch.stack(step_logits, 1),
            pred_boxes=self.tokens_to_boxes(pred_tokens),
            pred_tokens=pred_tokens,
            scores=torch.stack(step_probs, 1).prod(1),
        )


# ------------------------------------------------------------------------------------------------ visual entailment
@dataclass
class MPLUGImageTextClassifierOutput(ModelOutput):
    r"""
    Output of [`MPLUGForVisualEntailment`] and [`MPLUGForVisualReasoning`].

    Args:
        loss (`torch.FloatTensor` of shape `()`): cross-entropy against `labels`, when given.
        logits (`torch.FloatTensor` of shape `(batch_size, num_labels)`): class scores.
        fused_text_embeds (`torch.FloatTensor` of shape `(batch_size, length, hidden_size)`): T' of the trunk.
        vision_hidden_states, ..., fusion_cross_attentions (*optional*, with `output_hidden_states=True` /
            `output_attentions=True`): the recorded states, as in [`MPLUGModelOutput`] (visual reasoning: the vision
            tower's over both images as rows `2b`, `2b + 1`, and the text encoder's).
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    fused_text_embeds: torch.FloatTensor | None = None
    vision_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    vision_attentions: tuple[torch.FloatTensor, ...] | None = None
    text_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    text_attentions: tuple[torch.FloatTensor, ...] | None = None
    fusion_image_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    fusion_text_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    fusion_attentions: tuple[torch.FloatTensor, ...] | None = None
    fusion_cross_attentions: tuple[torch.FloatTensor, ...] | None = None


def _classifier_head(config: MPLUGConfig) -> nn.Sequential:
    """The ALBEF/mPLUG classification MLP on the fused `[CLS]`: `Linear(h, h)`, ReLU, `Linear(h, num_labels)`."""
    if config.num_labels < 2:
        raise ValueError(f"`config.num_labels` must be >= 2, got {config.num_labels}.")
    hidden = config.hidden_size
    return nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, config.num_labels))


def _classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of `(B, num_labels)` logits against class ids `(B,)`, validated."""
    labels = torch.as_tensor(labels, device=logits.device)
    if labels.shape != logits.shape[:1]:
        raise ValueError(f"`labels` must have shape ({logits.shape[0]},), got {tuple(labels.shape)}.")
    if bool((labels < 0).any()) or bool((labels >= logits.shape[-1]).any()):
        raise ValueError(f"`labels` must be class ids in [0, {logits.shape[-1]}).")
    return nn.functional.cross_entropy(logits.float(), labels.long())


class MPLUGForVisualEntailment(MPLUGPreTrainedModel):
    r"""
    mPLUG for image-text entailment (SNLI-VE): does the image entail, contradict or leave open a hypothesis? An MLP
    (`Linear(h, h)`, ReLU, `Linear(h, num_labels)`) on the fused text `[CLS]` of the trunk, as the ALBEF/mPLUG
    classification heads. `config.num_labels` / `config.id2label` name the classes (SNLI-VE: 3, entailment /
    neutral / contradiction); the trunk loads from any mPLUG folder.

    Example:
        >>> import torch
        >>> from transformers_mplug import MPLUGConfig, MPLUGForVisualEntailment
        >>> config = MPLUGConfig(
        ...     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        ...                        image_size=32, patch_size=16),
        ...     text_config=dict(vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        ...                      intermediate_size=64),
        ...     num_cross_modal_layers=2, num_decoder_layers=1, bos_token_id=101, eos_token_id=102,
        ...     id2label={0: "entailment", 1: "neutral", 2: "contradiction"},
        ... )
        >>> model = MPLUGForVisualEntailment(config).eval()
        >>> out = model(pixel_values=torch.randn(2, 3, 32, 32), input_ids=torch.tensor([[101, 7, 8], [101, 9, 10]]),
        ...             labels=torch.tensor([0, 2]))
        >>> out.logits.shape, out.loss.shape
        (torch.Size([2, 3]), torch.Size([]))
    """

    def __init__(self, config: MPLUGConfig) -> None:
        super().__init__(config)
        self.mplug = MPLUGModel(config)
        self.classifier = _classifier_head(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.mplug.get_input_embeddings()

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MPLUGImageTextClassifierOutput | tuple:
        r"""
        Args:
            pixel_values, input_ids, attention_mask, image_embeds: the image(s) and hypotheses, as for [`MPLUGModel`].
            labels (`torch.LongTensor` of shape `(batch_size,)`): class ids in `[0, num_labels)`.
            output_hidden_states, output_attentions: every stage's hidden states / attentions.
        """
        _reject_unused_kwargs(self, kwargs)
        trunk = self.mplug(
            pixel_values=pixel_values,
            input_ids=input_ids,
            attention_mask=attention_mask,
            image_embeds=image_embeds,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            return_dict=True,
        )
        logits = self.classifier(trunk.fused_text_embeds[:, 0])
        loss = None if labels is None else _classification_loss(logits, labels)
        output = MPLUGImageTextClassifierOutput(
            loss=loss, logits=logits, fused_text_embeds=trunk.fused_text_embeds, **_recorded_fields(trunk)
        )
        return output


# ------------------------------------------------------------------------------------------------ visual reasoning
class MPLUGForVisualReasoning(MPLUGPreTrainedModel):
    r"""
    mPLUG for visual reasoning over image pairs (NLVR2: is a sentence true of two images?), as the paper describes
    (following BLIP): in each co-attention layer of the fusion the text cross-attends to each image with its own
    cross-attention (`crossattention` of the trunk for the first image, `pair_crossattention` for the second) and the
    two results are averaged before the feed-forward; connected-attention layers run once per image with the same
    weights and their text outputs are averaged. An MLP on the fused `[CLS]` classifies (`config.num_labels`, 2).

    Loading a single-image mPLUG folder initialises both cross-attentions from the one pretrained cross-attention.
    Inputs: `pixel_values` of shape `(B, 2, C, H, W)` (`processor.encode_image_pairs(pairs)`) and the sentences.

    Example:
        >>> import torch
        >>> from transformers_mplug import MPLUGConfig, MPLUGForVisualReasoning
        >>> config = MPLUGConfig(
        ...     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        ...                        image_size=32, patch_size=16),
        ...     text_config=dict(vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        ...                      intermediate_size=64),
        ...     num_cross_modal_layers=2, num_decoder_layers=1, bos_token_id=101, eos_token_id=102,
        ... )
        >>> model = MPLUGForVisualReasoning(config).eval()
        >>> out = model(pixel_values=torch.randn(2, 2, 3, 32, 32), input_ids=torch.tensor([[101, 7, 8], [101, 9, 10]]),
        ...             labels=torch.tensor([1, 0]))
        >>> out.logits.shape, out.loss.shape
        (torch.Size([2, 2]), torch.Size([]))
    """

    def __init__(self, config: MPLUGConfig) -> None:
        super().__init__(config)
        self.mplug = MPLUGModel(config)
        self.pair_crossattention = nn.ModuleDict(
            {
                str(index): BertAttention(config.text_config, layer_idx=index, is_cross_attention=True)
                for index, layer_type in enumerate(config.cross_modal_layer_types)
                if layer_type == CO_ATTENTION
            }
        )
        self.classifier = _classifier_head(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.mplug.get_input_embeddings()

    @torch.no_grad()
    def copy_cross_attention_to_second_image(self) -> None:
        """Initialise the second image's cross-attentions from the first's (the single-image checkpoint's)."""
        for index, attention in self.pair_crossattention.items():
            attention.load_state_dict(self.mplug.cross_modal_encoder.layer[int(index)].crossattention.state_dict())

    def _derive_missing_weights(self, missing: set[str]) -> set[str]:
        derived = {k for k in missing if k.startswith("pair_crossattention.")}
        if derived:
            logger.info("Single-image checkpoint: the second image's cross-attentions start from the first's.")
            self.copy_cross_attention_to_second_image()
        return derived

    def _pair_cross_attention(
        self, index: int, image_a: torch.Tensor, image_b: torch.Tensor
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        """Co-attention layer `index`'s cross-attention step over both images: the layer's own cross-attention to the
        first, `pair_crossattention[index]` to the second, averaged (the hook of `MPLUGCrossModalLayer.forward`)."""
        layer, second = self.mplug.cross_modal_encoder.layer[index], self.pair_crossattention[str(index)]

        def both_images(queries: torch.Tensor) -> torch.Tensor:
            first = layer.cross_attend(queries, image_a)
            return (first + second(queries, encoder_hidden_states=image_b, encoder_attention_mask=None)[0]) / 2

        return both_images

    def fuse_pair(
        self, image_a: torch.Tensor, image_b: torch.Tensor, text: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """The fused text `(B, L, hidden_size)` of a sentence over two images' features `(B, N, hidden_size)`."""
        encoder = self.mplug.cross_modal_encoder
        text_mask, joint_mask = encoder.masks(image_a, text, attention_mask)
        for index, layer in enumerate(encoder.layer):
            if layer.layer_type == CO_ATTENTION:
                both_images = self._pair_cross_attention(index, image_a, image_b)
                _, text = layer(image_a, text, text_mask, joint_mask, cross_attention=both_images)
            else:
                image_a, text_a = layer(image_a, text, text_mask, joint_mask)
                image_b, text_b = layer(image_b, text, text_mask, joint_mask)
                text = (text_a + text_b) / 2
        return text

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MPLUGImageTextClassifierOutput | tuple:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(B, 2, C, H, W)`): the image pairs.
            input_ids, attention_mask (`(B, L)`): the sentences.
            labels (`torch.LongTensor` of shape `(B,)`): class ids (NLVR2: 1 = true, 0 = false).
            output_hidden_states, output_attentions: the vision tower's (both images) and the text encoder's
                hidden states / attentions (the pair fusion is not recorded).
        """
        _reject_unused_kwargs(self, kwargs)
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 5 or pixel_values.shape[1] != 2:
            shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else None
            raise ValueError(
                "`pixel_values` must hold two images per example, shape (batch, 2, channels, height, width) "
                f"(`processor.encode_image_pairs`), got {shape}."
            )
        if input_ids is None:
            raise ValueError("`input_ids` (the sentences) is required.")
        attention_mask = _text_attention_mask(input_ids, attention_mask, self.config.pad_token_id)
        if pixel_values.shape[0] != input_ids.shape[0]:
            raise ValueError(f"Batch size mismatch: {pixel_values.shape[0]} image pairs, {input_ids.shape[0]} texts.")
        batch_size = pixel_values.shape[0]
        hidden, attentions = _output_flags(self.config, output_hidden_states, output_attentions)

        encoded = self.mplug.encode_separately(
            pixel_values.flatten(0, 1), input_ids, attention_mask, None, hidden, attentions
        )
        images = encoded.image_embeds.unflatten(0, (batch_size, 2))
        fused = self.fuse_pair(images[:, 0], images[:, 1], encoded.text_embeds, attention_mask)
        logits = self.classifier(fused[:, 0])
        loss = None if labels is None else _classification_loss(logits, labels)
        output = MPLUGImageTextClassifierOutput(
            loss=loss, logits=logits, fused_text_embeds=fused, **_recorded_fields(encoded)
        )
        return output


# ------------------------------------------------------------------------------------------------ pretraining
class MPLUGMomentumEncoder(nn.Module):
    """The momentum (teacher) copies of what ITC runs: vision tower (+ projection), text encoder and the two ITC
    projections. Never trained by gradients; updated as an EMA of the student by [`MPLUGMomentumCallback`]."""

    def __init__(self, config: MPLUGConfig) -> None:
        super().__init__()
        self.vision_model = MPLUGVisionTransformer(config.vision_config)
        self.vision_projection = MPLUGVisionProjection(config) if config.has_vision_projection else None
        self.text_model = BertModel(config.text_config, add_pooling_layer=False)
        self.vision_proj = nn.Linear(config.hidden_size, config.projection_dim)
        self.text_proj = nn.Linear(config.hidden_size, config.projection_dim)
        self.requires_grad_(False)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        frames = pixel_values[:, 0] if pixel_values.dim() == 5 else pixel_values
        states = self.vision_model(frames)
        if self.vision_projection is not None:
            states = self.vision_projection(states)
        return nn.functional.normalize(self.vision_proj(states[:, 0]), dim=-1)

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        states = self.text_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return nn.functional.normalize(self.text_proj(states[:, 0]), dim=-1)


@dataclass
class MPLUGPreTrainingOutput(ModelOutput):
    r"""
    Output of [`MPLUGForPreTraining`].

    Args:
        loss (`torch.FloatTensor` of shape `()`): the weighted sum of the enabled losses.
        loss_itc, loss_itm, loss_mlm, loss_prefix_lm (`torch.FloatTensor` of shape `()`): each objective (`None`
            when its weight is 0).
        similarity_i2t, similarity_t2i (`torch.FloatTensor`): ITC similarities against the batch and the queue.
        itm_logits (`torch.FloatTensor` of shape `(3 * batch_size, 2)`): ITM logits of [positives; hard negatives].
        mlm_logits (`torch.FloatTensor` of shape `(batch_size, length, vocab_size)`): MLM logits on the fused text.
        prefix_lm_logits (`torch.FloatTensor` of shape `(batch_size, target_length, vocab_size)`): decoder logits.
    """

    loss: torch.FloatTensor | None = None
    loss_itc: torch.FloatTensor | None = None
    loss_itm: torch.FloatTensor | None = None
    loss_mlm: torch.FloatTensor | None = None
    loss_prefix_lm: torch.FloatTensor | None = None
    similarity_i2t: torch.FloatTensor | None = None
    similarity_t2i: torch.FloatTensor | None = None
    itm_logits: torch.FloatTensor | None = None
    mlm_logits: torch.FloatTensor | None = None
    prefix_lm_logits: torch.FloatTensor | None = None


class MPLUGForPreTraining(MPLUGForRetrieval):
    r"""
    mPLUG pretraining (the paper's four objectives) on the shared trunk:

    - **ITC**: image-text contrastive loss with a momentum (EMA) teacher whose features serve as keys, a queue of
      `config.queue_size` past teacher features (gathered from every rank) and soft distillation targets
      (`config.distillation_alpha`).
    - **ITM**: image-text matching over 1 positive + 2 hard negatives per pair (drawn from the ITC similarities).
    - **MLM**: masked tokens (`mlm_input_ids`, `mlm_labels`, e.g. from [`MPLUGPretrainingCollator`]) predicted from
      the *fused* text states by an MLM head tied to the text encoder's word embeddings.
    - **PrefixLM**: the text encoder + fusion read an image and a caption prefix (`prefix_input_ids`); the decoder
      continues the caption (`prefix_lm_labels`: `[CLS] rest [SEP]`, padding -100), token-mean cross-entropy.

    `loss = sum_k config.pretraining_loss_weights[k] * loss_k`; a loss with weight 0 is not computed. Train with
    [`MPLUGMomentumCallback`] so the teacher follows the student (`momentum_update`). The weights load into every
    task head (`MPLUGForQuestionAnswering.from_pretrained(pretraining_folder)`; the pretraining-only weights are
    reported as unused). [`~MPLUGPreTrainedModel.from_unimodal_pretrained`] initialises it from a CLIP vision
    checkpoint and a BERT checkpoint, as the paper.

    Example:
        >>> import torch
        >>> from transformers_mplug import MPLUGConfig, MPLUGForPreTraining
        >>> config = MPLUGConfig(
        ...     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        ...                        image_size=32, patch_size=16),
        ...     text_config=dict(vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        ...                      intermediate_size=64),
        ...     num_cross_modal_layers=2, num_decoder_layers=1, projection_dim=16, queue_size=8,
        ...     bos_token_id=101, eos_token_id=102,
        ... )
        >>> model = MPLUGForPreTraining(config)
        >>> ids = torch.tensor([[101, 7, 8, 9], [101, 10, 11, 12]])
        >>> out = model(
        ...     pixel_values=torch.randn(2, 3, 32, 32), input_ids=ids,
        ...     mlm_input_ids=torch.tensor([[101, 103, 8, 9], [101, 10, 103, 12]]),
        ...     mlm_labels=torch.tensor([[-100, 7, -100, -100], [-100, -100, 11, -100]]),
        ...     prefix_input_ids=ids[:, :2], prefix_lm_labels=torch.tensor([[101, 8, 9, 102], [101, 11, 12, 102]]),
        ... )
        >>> sorted(k for k in out.keys() if k.startswith("loss_"))
        ['loss_itc', 'loss_itm', 'loss_mlm', 'loss_prefix_lm']
        >>> int(model.queue_ptr)  # two teacher features were queued
        2
    """

    _tied_weights_keys = {
        **MPLUGDecoderHeadMixin._tied_weights_keys,
        "mlm_head.predictions.decoder.weight": "mplug.text_model.embeddings.word_embeddings.weight",
        "mlm_head.predictions.decoder.bias": "mlm_head.predictions.bias",
    }

    def __init__(self, config: MPLUGConfig) -> None:
        MPLUGPreTrainedModel.__init__(self, config)
        self._build_retrieval_modules(config)
        self.mlm_head = BertOnlyMLMHead(config.text_config)
        self.text_decoder = _share_memory_across_sequences(BertLMHeadModel(config.text_decoder_config))
        self.momentum_encoder = MPLUGMomentumEncoder(config)
        queue = max(config.queue_size, 1)
        self.register_buffer("image_queue", torch.zeros(config.projection_dim, queue))
        self.register_buffer("text_queue", torch.zeros(config.projection_dim, queue))
        self.register_buffer("idx_queue", torch.full((1, queue), -100, dtype=torch.long))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.post_init()
        self.copy_student_to_momentum_encoder()

    def get_output_embeddings(self) -> nn.Module:
        return self.mlm_head.predictions.decoder

    def set_output_embeddings(self, new_embeddings: nn.Module) -> None:
        self.mlm_head.predictions.decoder = new_embeddings
        self.mlm_head.predictions.bias = new_embeddings.bias

    # ------------------------------------------------------------------------------------------- momentum
    def momentum_parameter_pairs(self) -> list[tuple[str, nn.Parameter, nn.Parameter]]:
        """`(name, teacher, student)` for every momentum-encoder parameter."""
        student = {
            "vision_model": self.mplug.vision_model,
            "vision_projection": self.mplug.vision_projection,
            "text_model": self.mplug.text_model,
            "vision_proj": self.vision_proj,
            "text_proj": self.text_proj,
        }
        pairs = []
        for name, teacher_module in self.momentum_encoder.named_children():
            student_params = dict(student[name].named_parameters())
            for param_name, teacher in teacher_module.named_parameters():
                pairs.append((f"{name}.{param_name}", teacher, student_params[param_name]))
        return pairs

    @torch.no_grad()
    def momentum_update(self, momentum: float | None = None) -> None:
        """`teacher <- momentum * teacher + (1 - momentum) * student` for every momentum parameter
        (`config.momentum` by default). Works on plain, DDP, ZeRO-2 and ZeRO-3 (partitioned) parameters: each rank
        updates its own shard, no communication."""
        momentum = self.config.momentum if momentum is None else float(momentum)
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"`momentum` must be in [0, 1], got {momentum!r}.")
        from .training import ema_update_  # the distributed (DeepSpeed ZeRO-3) handling lives in training.py

        for name, teacher, student in self.momentum_parameter_pairs():
            ema_update_(teacher, student, momentum, name)

    def copy_student_to_momentum_encoder(self) -> None:
        """Make the teacher equal to the student (done at construction and when a checkpoint has no teacher)."""
        self.momentum_update(0.0)

    def _derive_missing_weights(self, missing: set[str]) -> set[str]:
        if not any(k.startswith("momentum_encoder.") for k in missing):
            return set()
        # a task or converted folder: the teacher starts as the student, the queues empty (initialised)
        logger.info("The checkpoint has no momentum encoder; it starts as a copy of the loaded weights.")
        self.copy_student_to_momentum_encoder()
        training_state = ("momentum_encoder.", "image_queue", "text_queue", "idx_queue", "queue_ptr")
        return {k for k in missing if k.startswith(training_state)}

    @torch.no_grad()
    def _enqueue(self, image_features: torch.Tensor, text_features: torch.Tensor, idx: torch.Tensor) -> None:
        if self.config.queue_size == 0:
            return
        from .training import gather_across_ranks  # every rank enqueues every rank's features, as the original

        image_features = gather_across_ranks(image_features)
        text_features = gather_across_ranks(text_features)
        idx = gather_across_ranks(idx)
        size = self.config.queue_size
        if image_features.shape[0] > size:
            image_features, text_features, idx = image_features[-size:], text_features[-size:], idx[-size:]
        ptr = int(self.queue_ptr)
        slots = (ptr + torch.arange(image_features.shape[0], device=self.image_queue.device)) % size
        self.image_queue[:, slots] = image_features.t().to(self.image_queue.dtype)
        self.text_queue[:, slots] = text_features.t().to(self.text_queue.dtype)
        self.idx_queue[0, slots] = idx.to(self.idx_queue.device)
        self.queue_ptr.fill_((ptr + image_features.shape[0]) % size)

    # ------------------------------------------------------------------------------------------- forward
    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        mlm_input_ids: torch.Tensor | None = None,
        mlm_labels: torch.Tensor | None = None,
        prefix_input_ids: torch.Tensor | None = None,
        prefix_attention_mask: torch.Tensor | None = None,
        prefix_lm_labels: torch.Tensor | None = None,
        idx: torch.Tensor | None = None,
        alpha: float | None = None,
        negative_image_indices: torch.Tensor | None = None,
        negative_text_indices: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MPLUGPreTrainingOutput | tuple:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(B, C, H, W)`): the images.
            input_ids, attention_mask (`(B, L)`): the captions (`[CLS] text`), for ITC and ITM.
            mlm_input_ids, mlm_labels (`(B, L)`): the captions with 15 % of the tokens masked, and the original
                ids at the masked positions (-100 elsewhere); needed when the `"mlm"` weight is > 0. The mask is
                `attention_mask`.
            prefix_input_ids, prefix_attention_mask (`(B, P)`): caption prefixes for PrefixLM.
            prefix_lm_labels (`(B, T)`): their continuations `[CLS] rest [SEP]` (padding -100).
            idx (`(B,)`): image ids; captions of the same image are ITC positives and never ITM negatives.
            alpha (`float`): distillation weight (default `config.distillation_alpha`).
            negative_image_indices, negative_text_indices (`(B,)`): ITM negatives to use instead of drawing them.
            output_hidden_states, output_attentions: not recorded here (the step runs a pass per objective); record
                a pass with a task head or [`MPLUGModel`] built from this folder.
        """
        _reject_unused_kwargs(self, kwargs)
        if any(_output_flags(self.config, output_hidden_states, output_attentions)):
            raise ValueError(
                "MPLUGForPreTraining does not record hidden states/attentions (its step runs a pass per objective); "
                "load the folder into MPLUGModel or a task head and pass `output_hidden_states=True` there."
            )
        weights = self.config.pretraining_loss_weights
        if pixel_values is None:
            raise ValueError("`pixel_values` (the images) is required.")
        if input_ids is None:
            raise ValueError("`input_ids` (the captions from the processor) is required.")
        attention_mask = _text_attention_mask(input_ids, attention_mask, self.config.pad_token_id)
        batch_size = input_ids.shape[0]
        if pixel_values.shape[0] != batch_size:
            raise ValueError(f"Batch size mismatch: {pixel_values.shape[0]} images but {batch_size} captions.")
        if weights["itm"] > 0 and batch_size < 2:
            raise ValueError("ITM needs a batch of at least 2 pairs (hard negatives come from it).")
        if weights["mlm"] > 0 and (mlm_input_ids is None or mlm_labels is None):
            raise ValueError(
                "The MLM loss needs `mlm_input_ids` and `mlm_labels` (use MPLUGPretrainingCollator), or set "
                "`config.pretraining_loss_weights['mlm'] = 0`."
            )
        if weights["prefix_lm"] > 0 and (prefix_input_ids is None or prefix_lm_labels is None):
            raise ValueError(
                "The PrefixLM loss needs `prefix_input_ids` and `prefix_lm_labels` (use MPLUGPretrainingCollator), "
                "or set `config.pretraining_loss_weights['prefix_lm'] = 0`."
            )
        if idx is None:
            idx = torch.arange(batch_size, device=input_ids.device)
        alpha = self.config.distillation_alpha if alpha is None else float(alpha)

        image_embeds = self.mplug.encode_image(pixel_values)[1]
        losses: dict[str, torch.Tensor] = {}
        output = MPLUGPreTrainingOutput()
        if weights["itc"] > 0 or weights["itm"] > 0:
            text_embeds = self.mplug.encode_text(input_ids, attention_mask)
            image_features = self._image_features(image_embeds)
            text_features = self._text_features(text_embeds)
            with torch.no_grad():
                self.temp.clamp_(0.001, 0.5)
                image_features_m = self.momentum_encoder.image_features(pixel_values)
                text_features_m = self.momentum_encoder.text_features(input_ids, attention_mask)
            queues = {}
            if self.config.queue_size > 0:
                queues = {
                    "image_queue": self.image_queue.clone(),
                    "text_queue": self.text_queue.clone(),
                    "idx_queue": self.idx_queue.clone(),
                }
            loss_itc, sim_i2t, sim_t2i = self.itc_loss(
                image_features, text_features, idx, image_features_m, text_features_m, alpha=alpha, **queues
            )
            output.similarity_i2t, output.similarity_t2i = sim_i2t, sim_t2i
            if weights["itc"] > 0:
                losses["itc"] = loss_itc
            if weights["itm"] > 0:
                losses["itm"], output.itm_logits, _, _ = self.itm_loss(
                    image_embeds,
                    text_embeds,
                    attention_mask,
                    sim_i2t,
                    sim_t2i,
                    idx,
                    negative_image_indices,
                    negative_text_indices,
                )
            if self.training:
                self._enqueue(image_features_m, text_features_m, idx)
        if weights["mlm"] > 0:
            if mlm_input_ids.shape != input_ids.shape or mlm_labels.shape != input_ids.shape:
                raise ValueError(
                    f"`mlm_input_ids` and `mlm_labels` must have the captions' shape {tuple(input_ids.shape)}."
                )
            masked_text = self.mplug.encode_text(mlm_input_ids, attention_mask)
            _, fused_text = self.mplug.cross_modal_encoder(image_embeds, masked_text, attention_mask)
            output.mlm_logits = self.mlm_head(fused_text)
            losses["mlm"] = nn.functional.cross_entropy(
                output.mlm_logits.float().reshape(-1, self.config.vocab_size), mlm_labels.reshape(-1), ignore_index=-100
            )
        if weights["prefix_lm"] > 0:
            if prefix_attention_mask is None:
                prefix_attention_mask = torch.ones_like(prefix_input_ids)
            if prefix_input_ids.shape[0] != batch_size or prefix_lm_labels.shape[0] != batch_size:
                raise ValueError("`prefix_input_ids` and `prefix_lm_labels` need one row per image.")
            prefix_text = self.mplug.encode_text(prefix_input_ids, prefix_attention_mask)
            fused_image, fused_prefix = self.mplug.cross_modal_encoder(image_embeds, prefix_text, prefix_attention_mask)
            memory = torch.cat([fused_image, fused_prefix], dim=1)
            memory_mask = torch.cat([prefix_attention_mask.new_ones(fused_image.shape[:2]), prefix_attention_mask], 1)
            decoder_ids, decoder_mask, labels = _decoder_inputs(
                prefix_lm_labels,
                None,
                None,
                self.config.pad_token_id,
                ("prefix_lm_labels", "prefix_lm_labels"),
                vocab_size=self.config.vocab_size,
            )
            logits = self.text_decoder(
                input_ids=decoder_ids,
                attention_mask=decoder_mask,
                encoder_hidden_states=memory,
                encoder_attention_mask=memory_mask,
                use_cache=False,
                return_dict=True,
            ).logits
            output.prefix_lm_logits = logits
            losses["prefix_lm"] = nn.functional.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        for name, value in losses.items():
            setattr(output, f"loss_{name}", value)
        output.loss = sum(weights[name] * value for name, value in losses.items())
        return output


__all__ = [
    "MPLUGModel",
    "MPLUGPreTrainedModel",
    "MPLUGModelOutput",
    "MPLUGForQuestionAnswering",
    "MPLUGForCaptioning",
    "MPLUGDecoderOutput",
    "MPLUGAnswerRankingOutput",
    "MPLUGForRetrieval",
    "MPLUGRetrievalOutput",
    "MPLUGCorpusRetrievalOutput",
    "MPLUGForGrounding",
    "MPLUGGroundingOutput",
    "MPLUGForPreTraining",
    "MPLUGPreTrainingOutput",
    "MPLUGForVisualEntailment",
    "MPLUGImageTextClassifierOutput",
    "MPLUGMomentumEncoder",
    "MPLUGSharedMemoryCrossAttention",
    "MPLUGSharedMemoryCache",
]
