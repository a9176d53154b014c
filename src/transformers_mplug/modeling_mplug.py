"""PyTorch mPLUG trunk: CLIP vision tower, BERT text encoder and the skip-connected cross-modal encoder."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import BertConfig, BertModel, CLIPVisionConfig, PreTrainedModel
from transformers import initialization as init
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.bert.modeling_bert import BertAttention, BertEmbeddings, BertIntermediate, BertOutput
from transformers.models.clip.modeling_clip import CLIPEncoder, CLIPVisionEmbeddings
from transformers.utils import ModelOutput, logging

from .configuration_mplug import CO_ATTENTION, MPLUGConfig

logger = logging.get_logger(__name__)


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
    """

    last_hidden_state: torch.FloatTensor | None = None
    memory_attention_mask: torch.LongTensor | None = None
    fused_image_embeds: torch.FloatTensor | None = None
    fused_text_embeds: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    vision_last_hidden_state: torch.FloatTensor | None = None


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
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def _feed_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.output(self.intermediate(hidden_states), hidden_states)

    def forward(
        self,
        image_embeds: torch.Tensor,
        text_embeds: torch.Tensor,
        text_mask: torch.Tensor | None,
        joint_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.layer_type == CO_ATTENTION:
            text_embeds = self.attention(text_embeds, attention_mask=text_mask)[0]
            text_embeds = self.crossattention(
                text_embeds, encoder_hidden_states=image_embeds, encoder_attention_mask=None
            )[0]
            return image_embeds, self._feed_forward(text_embeds)
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

    def forward(
        self, image_embeds: torch.Tensor, text_embeds: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
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
        for layer in self.layer:
            image_embeds, text_embeds = layer(image_embeds, text_embeds, text_mask, joint_mask)
        return image_embeds, text_embeds


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
    _supports_sdpa = True
    _supports_attention_backend = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, CLIPVisionEmbeddings):
            init.normal_(module.class_embedding, mean=0.0, std=module.embed_dim**-0.5)
            init.copy_(module.position_ids, torch.arange(module.num_positions).expand((1, -1)))
        elif isinstance(module, BertEmbeddings):
            init.copy_(module.position_ids, torch.arange(module.position_ids.shape[-1]).expand((1, -1)))
            init.zeros_(module.token_type_ids)


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

    def __init__(self, config: MPLUGConfig) -> None:
        super().__init__(config)
        for sub_config in (config.vision_config, config.text_config):
            if sub_config._attn_implementation is None:
                sub_config._attn_implementation = config._attn_implementation
        self.vision_model = MPLUGVisionTransformer(config.vision_config)
        self.vision_projection = MPLUGVisionProjection(config) if config.has_vision_projection else None
        self.text_model = BertModel(config.text_config, add_pooling_layer=False)
        self.cross_modal_encoder = MPLUGCrossModalEncoder(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.text_model.get_input_embeddings()

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
        batch_size = pixel_values.shape[0]
        frames = pixel_values.flatten(0, 1) if pixel_values.dim() == 5 else pixel_values
        vision_states = self.vision_model(frames, interpolate_pos_encoding=interpolate_pos_encoding)
        if pixel_values.dim() == 5:
            vision_states = vision_states.reshape(batch_size, -1, vision_states.shape[-1])
        image_embeds = vision_states if self.vision_projection is None else self.vision_projection(vision_states)
        return vision_states, image_embeds

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run the BERT text encoder; returns its last hidden state `(B, L, hidden_size)`."""
        return self.text_model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True).last_hidden_state

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        return_dict: bool | None = None,
        **kwargs,
    ) -> MPLUGModelOutput | tuple[torch.Tensor, ...]:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(B, C, H, W)` or `(B, T, C, H, W)` for video):
                Images as produced by [`MPLUGProcessor`]. Not needed when `image_embeds` is given.
            input_ids (`torch.LongTensor` of shape `(B, L)`):
                Text ids in the mPLUG contract (`[CLS] text`, no trailing `[SEP]`).
            attention_mask (`torch.LongTensor` of shape `(B, L)`, *optional*):
                1 for real tokens, 0 for padding. Defaults to all ones.
            image_embeds (`torch.FloatTensor` of shape `(B, N, hidden_size)`, *optional*):
                Precomputed V (the second output of [`~MPLUGModel.encode_image`]) to skip the vision tower.
        """
        if kwargs:
            raise TypeError(f"MPLUGModel.forward() got unexpected keyword argument(s) {sorted(kwargs)}.")
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if input_ids is None:
            raise ValueError("`input_ids` is required: pass the processor's text ids.")
        if input_ids.dim() != 2:
            raise ValueError(f"`input_ids` must have shape (batch, length), got {tuple(input_ids.shape)}.")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        elif attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"`attention_mask` shape {tuple(attention_mask.shape)} must equal `input_ids` shape {tuple(input_ids.shape)}."
            )

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

        text_embeds = self.encode_text(input_ids, attention_mask)
        fused_image, fused_text = self.cross_modal_encoder(image_embeds, text_embeds, attention_mask)
        memory = torch.cat([fused_image, fused_text], dim=1)
        memory_mask = torch.cat([attention_mask.new_ones(fused_image.shape[:2]), attention_mask], dim=1)
        output = MPLUGModelOutput(
            last_hidden_state=memory,
            memory_attention_mask=memory_mask,
            fused_image_embeds=fused_image,
            fused_text_embeds=fused_text,
            image_embeds=image_embeds,
            text_embeds=text_embeds,
            vision_last_hidden_state=vision_states,
        )
        return output if return_dict else output.to_tuple()


__all__ = ["MPLUGModel", "MPLUGPreTrainedModel", "MPLUGModelOutput"]
