"""Processor of mPLUG: the image processor plus a BERT WordPiece tokenizer with mPLUG's token contract."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from transformers import BatchFeature, BertTokenizer, ProcessorMixin
from transformers.image_processing_base import ImageProcessingMixin
from transformers.processing_utils import ImagesKwargs, ProcessingKwargs, TextKwargs, Unpack, VideosKwargs
from transformers.utils import logging

from .image_processing_mplug import MPLUGImageProcessor, boxes_to_coordinate_tokens, coordinate_tokens_to_boxes
from .tokenization_mplug import MPLUGTokenizer

logger = logging.get_logger(__name__)

_DECODE_STRIP = ("[SEP]", "[CLS]", "[PAD]")


def load_vocab(vocab_file: str | os.PathLike) -> dict[str, int]:
    """Read a WordPiece `vocab.txt` (one token per line, id = line number)."""
    with open(vocab_file, encoding="utf-8") as handle:
        vocab = {line.rstrip("\n"): index for index, line in enumerate(handle)}
    if not vocab:
        raise ValueError(f"`vocab_file` {vocab_file} is empty.")
    return vocab


def _as_mplug_tokenizer(tokenizer: BertTokenizer) -> MPLUGTokenizer:
    """The same WordPiece vocabulary, added tokens and settings as an [`MPLUGTokenizer`] (which carries mPLUG's token
    contract); refuses a tokenizer whose ids it cannot reproduce."""
    base_size = tokenizer.vocab_size  # the WordPiece vocabulary, without added tokens
    vocab = {token: index for token, index in tokenizer.get_vocab().items() if index < base_size}
    converted = MPLUGTokenizer(
        vocab=dict(sorted(vocab.items(), key=lambda item: item[1])),
        do_lower_case=getattr(tokenizer, "do_lower_case", True),
        tokenize_chinese_chars=getattr(tokenizer, "tokenize_chinese_chars", True),
        strip_accents=getattr(tokenizer, "strip_accents", None),
        model_max_length=tokenizer.model_max_length,
        unk_token=tokenizer.unk_token,
        sep_token=tokenizer.sep_token,
        pad_token=tokenizer.pad_token,
        cls_token=tokenizer.cls_token,
        mask_token=tokenizer.mask_token,
    )
    added = [token for index, token in sorted(tokenizer.added_tokens_decoder.items()) if index >= base_size]
    if added:
        converted.add_tokens(added)
    extra = list(getattr(tokenizer, "extra_special_tokens", None) or [])
    if extra:
        converted.add_special_tokens({"additional_special_tokens": extra})
    if converted.get_vocab() != tokenizer.get_vocab():
        raise ValueError(
            "`tokenizer` cannot be carried over to an MPLUGTokenizer with the same ids; save it as one "
            "(`MPLUGTokenizer(vocab=...)`) or build the processor with `MPLUGProcessor.from_vocab_file`."
        )
    return converted


class MPLUGProcessorKwargs(ProcessingKwargs, total=False):
    """transformers' processing kwargs of [`MPLUGProcessor`]: `text_kwargs` (`padding`, `truncation`, `max_length`,
    `text_pair`, `text_target`), `images_kwargs` / `videos_kwargs` (`return_tensors`), `common_kwargs`."""

    # (`return_tensors` defaults to "pt" in the processor: transformers 5.2 writes user `common_kwargs` into the
    # class's `_defaults["common_kwargs"]`, so the processor folds common kwargs in itself)
    _defaults = {"text_kwargs": {"padding": "longest"}}


# the text kwargs MPLUGProcessor implements, and the values the others may have (they are not implemented)
_TEXT_KWARGS = {"padding", "truncation", "max_length", "return_tensors", "text_pair", "text_target"}
_TEXT_KWARGS_AT_DEFAULT = {
    "add_special_tokens": (True,),
    "return_attention_mask": (True, None),
    "return_token_type_ids": (False, None),
    "padding_side": ("right", None),
    "verbose": (True, False, None),
}
_MODALITY_KEYS = {
    "text_kwargs": set(TextKwargs.__annotations__),
    "images_kwargs": set(ImagesKwargs.__annotations__),
    "videos_kwargs": set(VideosKwargs.__annotations__),
}
_FLAT_KWARGS = (
    set(TextKwargs.__annotations__)
    | set(ImagesKwargs.__annotations__)
    | set(VideosKwargs.__annotations__)
    | {"text_kwargs", "images_kwargs", "videos_kwargs", "audio_kwargs", "common_kwargs"}
)


class MPLUGProcessor(ProcessorMixin):
    r"""
    Wraps an [`MPLUGImageProcessor`] and a BERT tokenizer into one processor with the original mPLUG text contract:

    - questions / captions / prompts encode as `[CLS] text` with **no** trailing `[SEP]`;
    - targets (`text_target`: answers, captions to learn) encode as `[CLS] text [SEP]`;
    - pairs (`text_pair`) encode as `[CLS] A [SEP] B [SEP]`;
    - `truncation=True, max_length=m` keeps the first `m` ids; padding is on the right with `[PAD]` (0).

    Example:
        >>> from PIL import Image
        >>> from transformers import BertTokenizer
        >>> from transformers_mplug import MPLUGImageProcessor, MPLUGProcessor
        >>> vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "what", "is", "red"]
        >>> tokenizer = BertTokenizer(vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=True)
        >>> processor = MPLUGProcessor(MPLUGImageProcessor(size={"height": 32, "width": 32}), tokenizer)
        >>> batch = processor(images=Image.new("RGB", (64, 48)), text="What is red", text_target="red")
        >>> batch["input_ids"].tolist(), batch["labels"].tolist(), tuple(batch["pixel_values"].shape)
        ([[2, 5, 6, 7]], [[2, 7, 3]], (1, 3, 32, 32))

    With a real vocabulary: `MPLUGProcessor.from_vocab_file("vocab.txt", image_size=384)`.

    `default_text_kwargs` (saved in `processor_config.json`) sets what `__call__` uses for `padding`, `truncation` and
    `max_length` when they are not passed, e.g. ModelScope's `{"padding": "max_length", "truncation": True,
    "max_length": 25}` in folders converted from ModelScope (whose tokenizer also ends texts with `[SEP]`).
    """

    attributes = ["image_processor", "tokenizer"]

    def __init__(
        self,
        image_processor: MPLUGImageProcessor,
        tokenizer: BertTokenizer,
        coordinate_start_token: str = "[unused340]",
        num_coordinate_bins: int = 337,
        default_text_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        # (checked by base class, not identity: remote-code folders load the class from a copied module)
        if not isinstance(image_processor, ImageProcessingMixin):
            raise TypeError(f"`image_processor` must be an MPLUGImageProcessor, got {type(image_processor).__name__}.")
        if tokenizer is None or tokenizer.cls_token_id is None or tokenizer.sep_token_id is None:
            raise TypeError("`tokenizer` must be a BERT WordPiece tokenizer with [CLS] and [SEP] tokens.")
        vocab = tokenizer.get_vocab()
        absent = [
            token
            for token in (tokenizer.cls_token, tokenizer.sep_token, tokenizer.pad_token, tokenizer.mask_token)
            if token is None or token not in vocab or vocab[token] >= tokenizer.vocab_size
        ]
        if absent:
            raise ValueError(
                f"The tokenizer's vocabulary lacks the special token(s) {absent} ([CLS], [SEP], [PAD] and [MASK] must "
                "be lines of vocab.txt); use bert-base-uncased's vocab.txt or one laid out like it."
            )
        if not set(vocab) - set(tokenizer.all_special_tokens):
            raise ValueError(
                f"The tokenizer holds only its {len(vocab)} special tokens, so every word would become [UNK]: its "
                "vocabulary file (`tokenizer.json` or `vocab.txt`) was not loaded. Load the processor from a folder "
                "that has it, or build it with `MPLUGProcessor.from_vocab_file`."
            )
        if type(tokenizer).__name__ != "MPLUGTokenizer":  # e.g. a folder saved with a BertTokenizer: same vocabulary
            tokenizer = _as_mplug_tokenizer(tokenizer)
        if not isinstance(num_coordinate_bins, int) or num_coordinate_bins < 2:
            raise ValueError(f"`num_coordinate_bins` must be an int >= 2, got {num_coordinate_bins!r}.")
        self.coordinate_start_token = coordinate_start_token
        self.num_coordinate_bins = num_coordinate_bins
        self.default_text_kwargs = self._checked_text_kwargs(default_text_kwargs)
        super().__init__(image_processor, tokenizer, **kwargs)

    @staticmethod
    def _checked_text_kwargs(value: dict[str, Any] | None) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise TypeError(f"`default_text_kwargs` must be a dict, got {type(value).__name__}.")
        unknown = sorted(set(value) - {"padding", "truncation", "max_length"})
        if unknown:
            raise ValueError(f"`default_text_kwargs` takes `padding`, `truncation` and `max_length`, got {unknown}.")
        if value.get("padding", "longest") not in (True, False, "longest", "max_length", "do_not_pad"):
            raise ValueError(f"`default_text_kwargs['padding']` is not a padding strategy: {value['padding']!r}.")
        if value.get("truncation") not in (None, True, False):
            raise ValueError(f"`default_text_kwargs['truncation']` must be a bool, got {value['truncation']!r}.")
        length = value.get("max_length")
        if length is not None and (not isinstance(length, int) or isinstance(length, bool) or length < 1):
            raise ValueError(f"`default_text_kwargs['max_length']` must be an int >= 1, got {length!r}.")
        if value.get("padding") == "max_length" and length is None:
            raise ValueError("`default_text_kwargs` with `padding='max_length'` needs `max_length`.")
        return dict(value)

    @classmethod
    def from_vocab_file(
        cls,
        vocab_file: str | os.PathLike,
        image_size: int = 384,
        model_max_length: int = 512,
        end_text_with_sep: bool = False,
        default_text_kwargs: dict[str, Any] | None = None,
        **image_kwargs: Any,
    ) -> MPLUGProcessor:
        """Build a processor from a WordPiece `vocab.txt` (lower-casing, as bert-base-uncased) and a resolution;
        `model_max_length` is the text encoder's positions (texts longer than it are truncated by default).
        `end_text_with_sep` and `default_text_kwargs` give ModelScope's text contract (see the class)."""
        tokenizer = MPLUGTokenizer(
            vocab=load_vocab(vocab_file),
            do_lower_case=True,
            model_max_length=model_max_length,
            end_text_with_sep=end_text_with_sep,
        )
        image_processor = MPLUGImageProcessor(size={"height": image_size, "width": image_size}, **image_kwargs)
        return cls(image_processor=image_processor, tokenizer=tokenizer, default_text_kwargs=default_text_kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args: Any, **kwargs: Any):
        """As `ProcessorMixin.from_pretrained`; a local folder must hold the tokenizer's files (`tokenizer.json` or
        `vocab.txt`) and `preprocessor_config.json` (otherwise transformers would build a stand-in that maps every
        word to `[UNK]`)."""
        folder = os.fspath(pretrained_model_name_or_path)
        if os.path.isdir(folder):
            files = set(os.listdir(folder))
            if not files & {"tokenizer.json", "vocab.txt"}:
                raise ValueError(
                    f"{folder} has no tokenizer file (`tokenizer.json` or `vocab.txt`); save the processor there "
                    "(`processor.save_pretrained(folder)`) or build it with `MPLUGProcessor.from_vocab_file`."
                )
            if not files & {"preprocessor_config.json", "processor_config.json"}:
                raise ValueError(f"{folder} has no `preprocessor_config.json`; save the processor there.")
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    # ----------------------------------------------------------------------------------------------- text
    @staticmethod
    def _as_text_list(text: Any, argument: str) -> list[str]:
        texts = [text] if isinstance(text, str) else text
        if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
            raise TypeError(f"`{argument}` must be a string or a list of strings, got {type(text).__name__}.")
        if not texts:
            raise ValueError(f"`{argument}` is an empty list; pass at least one string.")
        for index, item in enumerate(texts):
            if not item.strip():
                raise ValueError(f"`{argument}[{index}]` is an empty string; every text needs at least one word.")
        return list(texts)

    def encode_text(
        self,
        text: str | Sequence[str],
        add_eos: bool = False,
        padding: bool | str = "longest",
        truncation: bool | None = None,
        max_length: int | None = None,
        return_tensors: str | None = "pt",
        argument: str = "text",
    ) -> BatchFeature:
        """Encode texts as `[CLS] pieces` (`add_eos=False`: questions, captions as inputs) or `[CLS] pieces [SEP]`
        (`add_eos=True`: answers, caption targets), padded on the right; returns `input_ids` and `attention_mask`.

        Truncation keeps `[CLS]` and the first pieces, as the original tokenizer call: with `truncation=True` at
        `max_length` (default: the tokenizer's `model_max_length`, the text encoder's positions); by default
        (`truncation=None`) only texts longer than `model_max_length` are cut; `truncation=False` never cuts."""
        texts = self._as_text_list(text, argument)
        limit = self.tokenizer.model_max_length
        limit = limit if isinstance(limit, int) and 0 < limit < 1_000_000 else None
        if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
            raise ValueError(f"`max_length` must be an int >= 1, got {max_length!r}.")
        if truncation is None:
            cut = limit
        elif truncation:
            cut = max_length if max_length is not None else limit
            if cut is None:
                raise ValueError("`truncation=True` needs `max_length` (the tokenizer sets no `model_max_length`).")
        else:
            cut = None
        # the tokenizer's post-processor adds the special tokens (MPLUGTokenizer: `[CLS] text`, targets + `[SEP]`)
        if getattr(self.tokenizer, "end_text_with_sep", False):
            # ModelScope's contract: BERT's own truncation, which keeps the closing `[SEP]`
            cut_args = {"truncation": True, "max_length": cut} if cut is not None else {}
            ids = self.tokenizer(text_target=texts, **cut_args) if add_eos else self.tokenizer(texts, **cut_args)
            ids = ids["input_ids"]
        else:
            ids = (self.tokenizer(text_target=texts) if add_eos else self.tokenizer(texts))["input_ids"]
            if cut is not None:
                ids = [seq[:cut] for seq in ids]
        return self._pad(ids, padding, max_length, return_tensors)

    def encode_labels(
        self, texts: str | Sequence[str], truncation: bool | None = None, max_length: int | None = None
    ) -> torch.Tensor:
        """Decoder targets `[CLS] text [SEP]` padded with -100 (any number of answers / captions, e.g. several
        answers per question for [`MPLUGForQuestionAnswering`] with `answers_per_question`)."""
        encoded = self.encode_text(texts, add_eos=True, truncation=truncation, max_length=max_length, argument="texts")
        return encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100)

    def _pad(
        self, ids: list[list[int]], padding: bool | str, max_length: int | None, return_tensors: str | None
    ) -> BatchFeature:
        if padding is True:
            padding = "longest"
        if padding not in (False, "longest", "max_length", "do_not_pad"):
            raise ValueError(f"`padding` must be True, False, 'longest' or 'max_length', got {padding!r}.")
        if padding == "max_length" and max_length is None:
            raise ValueError("`padding='max_length'` needs `max_length`.")
        if padding in (False, "do_not_pad"):
            if return_tensors is not None and len({len(seq) for seq in ids}) > 1:
                raise ValueError("Texts of different lengths need `padding=True` to be returned as tensors.")
            return BatchFeature(
                {"input_ids": ids, "attention_mask": [[1] * len(seq) for seq in ids]}, tensor_type=return_tensors
            )
        length = max(len(seq) for seq in ids) if padding == "longest" else max(max_length, max(len(seq) for seq in ids))
        pad_id = self.tokenizer.pad_token_id
        input_ids = [seq + [pad_id] * (length - len(seq)) for seq in ids]
        attention_mask = [[1] * len(seq) + [0] * (length - len(seq)) for seq in ids]
        return BatchFeature({"input_ids": input_ids, "attention_mask": attention_mask}, tensor_type=return_tensors)

    def __call__(
        self,
        images: Any = None,
        text: str | Sequence[str] | None = None,
        videos: Any = None,
        text_pair: str | Sequence[str] | None = None,
        text_target: str | Sequence[str] | None = None,
        audio: Any = None,
        **kwargs: Unpack[MPLUGProcessorKwargs],
    ) -> BatchFeature:
        """Prepare model inputs.

        Args:
            images: one image or a list (PIL, NumPy `HWC`/`CHW`, torch tensors; uint8 or floats in [0, 1]); a list of
                frame lists is read as videos.
            text: question(s) / caption prompt(s) -> `input_ids`, `attention_mask` (`[CLS] text`).
            videos: one video (a list of frames) or a list of videos -> `pixel_values` `(B, T, C, H, W)`.
            text_pair: second segment(s) -> `[CLS] text [SEP] text_pair [SEP]` with `token_type_ids`.
            text_target: answers / target captions -> `labels` (`[CLS] text [SEP]`, padding = -100) and
                `decoder_attention_mask`.
            kwargs ([`MPLUGProcessorKwargs`]): transformers' processing kwargs, flat (`padding=`, `truncation=`,
                `max_length=`, `return_tensors=`) or per modality (`text_kwargs={...}`, `images_kwargs={...}`).
                Text kwargs not given come from the processor's `default_text_kwargs`, else `padding="longest"` and
                truncation at `model_max_length` only; `return_tensors` defaults to `"pt"`. Text kwargs this
                processor does not implement (`stride`, `pad_to_multiple_of`, ...) raise.
        """
        if audio is not None:
            raise TypeError("MPLUGProcessor takes no `audio`.")
        unknown = sorted(set(kwargs) - _FLAT_KWARGS)
        if unknown:
            raise TypeError(f"MPLUGProcessor got unexpected argument(s) {unknown}.")
        # flat kwargs go to the modalities that take them (one structure for every transformers release), then the
        # processor's `default_text_kwargs` fill what is not given, then transformers merges in its defaults
        nested = {name: dict(kwargs.pop(name, None) or {}) for name in _MODALITY_KEYS}
        common = dict(kwargs.pop("common_kwargs", None) or {})
        kwargs.pop("audio_kwargs", None)
        for key, value in kwargs.items():
            if value is None and key != "return_tensors":  # `None` = not given (the defaults apply)
                continue
            for name, keys in _MODALITY_KEYS.items():
                if key in keys:
                    if key in nested[name]:
                        raise ValueError(f"`{key}` was passed twice: as an argument and in `{name}`.")
                    nested[name][key] = value
        defaults = getattr(self, "default_text_kwargs", None) or {}
        nested["text_kwargs"] = {**{k: v for k, v in defaults.items() if k not in common}, **nested["text_kwargs"]}
        for name in nested:  # common kwargs: below the per-modality ones
            nested[name] = {"return_tensors": "pt", **common, **nested[name]}
        merged = self._merge_kwargs(MPLUGProcessorKwargs, tokenizer_init_kwargs=self.tokenizer.init_kwargs, **nested)
        text_kwargs = merged["text_kwargs"]
        unsupported = sorted(
            key
            for key, value in text_kwargs.items()
            if key not in _TEXT_KWARGS and value not in _TEXT_KWARGS_AT_DEFAULT.get(key, (None,))
        )
        if unsupported:
            raise TypeError(f"MPLUGProcessor does not implement the text argument(s) {unsupported}.")
        padding = text_kwargs.get("padding", "longest")
        truncation = text_kwargs.get("truncation")
        max_length = text_kwargs.get("max_length")
        return_tensors = text_kwargs.get("return_tensors", "pt")
        for name, value in (("text_pair", text_pair), ("text_target", text_target)):
            if name in text_kwargs and value is not None:
                raise ValueError(f"`{name}` was passed twice: as an argument and in `text_kwargs`.")
        text_pair = text_pair if text_pair is not None else text_kwargs.get("text_pair")
        text_target = text_target if text_target is not None else text_kwargs.get("text_target")
        visual_kwargs = merged["videos_kwargs" if videos is not None else "images_kwargs"]
        if images is None and videos is None and text is None and text_target is None:
            raise ValueError("Pass `images` (or `videos`) and/or `text` / `text_target`; got nothing to process.")
        if images is not None and videos is not None:
            raise ValueError("Pass either `images` or `videos`, not both.")
        if text_pair is not None and text is None:
            raise ValueError("`text_pair` needs `text`.")
        data: dict[str, Any] = {}
        if images is not None or videos is not None:
            visual = self.image_processor(images=images, videos=videos, **visual_kwargs)
            data.update(visual)
        num_texts = None
        if text is not None:
            if text_pair is not None:
                encoded = self._encode_pair(text, text_pair, padding, truncation, max_length, return_tensors)
            else:
                encoded = self.encode_text(text, False, padding, truncation, max_length, return_tensors, "text")
            data.update(encoded)
            num_texts = len(encoded["input_ids"])
        if text_target is not None:
            target = self.encode_text(text_target, True, padding, truncation, max_length, return_tensors, "text_target")
            labels = target["input_ids"]
            labels = (
                labels.masked_fill(target["attention_mask"] == 0, -100)
                if isinstance(labels, torch.Tensor)
                else [
                    [t if m else -100 for t, m in zip(row, mask)] for row, mask in zip(labels, target["attention_mask"])
                ]
            )
            data["labels"] = labels
            data["decoder_attention_mask"] = target["attention_mask"]
            if num_texts is not None and len(labels) != num_texts:
                raise ValueError(
                    f"`text` has {num_texts} entries but `text_target` has {len(labels)}; for several answers per "
                    "question encode the answers with `processor.encode_labels(answers)`."
                )
        if "pixel_values" in data and num_texts is not None and len(data["pixel_values"]) != num_texts:
            raise ValueError(
                f"Batch size mismatch: {len(data['pixel_values'])} image(s)/video(s) but {num_texts} text(s); pass one "
                "text per image."
            )
        return BatchFeature(data=data, tensor_type=return_tensors)

    def _encode_pair(self, text, text_pair, padding, truncation, max_length, return_tensors) -> BatchFeature:
        first = self._as_text_list(text, "text")
        second = self._as_text_list(text_pair, "text_pair")
        if len(first) != len(second):
            raise ValueError(f"`text` has {len(first)} entries but `text_pair` has {len(second)}.")
        return self.tokenizer(
            first,
            second,
            return_token_type_ids=True,
            padding=padding,
            truncation=True if truncation is None else truncation,  # by default: at `model_max_length`
            max_length=max_length,
            return_tensors=return_tensors,
        )

    # -------------------------------------------------------------------------------------------- image pairs
    def encode_image_pairs(self, pairs: Sequence[Sequence[Any]], return_tensors: str | None = "pt") -> BatchFeature:
        """Image pairs for [`MPLUGForVisualReasoning`] (NLVR2): a list of `(left, right)` images ->
        `pixel_values` of shape `(B, 2, C, H, W)`. Each entry must hold exactly two images."""
        if not isinstance(pairs, (list, tuple)) or not pairs:
            raise ValueError("`pairs` must be a non-empty list of (left, right) image pairs.")
        for index, pair in enumerate(pairs):
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                count = len(pair) if isinstance(pair, (list, tuple)) else 1
                raise ValueError(f"`pairs[{index}]` must hold two images (left, right), got {count}.")
        return self.image_processor(videos=[list(pair) for pair in pairs], return_tensors=return_tensors)

    # -------------------------------------------------------------------------------------------- grounding
    @property
    def coordinate_token_start_id(self) -> int:
        """Id of coordinate bin 0 (`[unused340]` = 345 in bert-base-uncased)."""
        token_id = self.tokenizer.convert_tokens_to_ids(self.coordinate_start_token)
        if token_id is None or token_id == self.tokenizer.unk_token_id:
            raise ValueError(f"`coordinate_start_token` {self.coordinate_start_token!r} is not in the vocabulary.")
        return token_id

    def encode_phrases(
        self, phrases: str | Sequence[str], max_length: int | None = None, return_tensors: str | None = "pt"
    ) -> BatchFeature:
        """Grounding phrases as the original dataset code builds them: `[CLS] pieces [SEP]` (with `[SEP]`), pieces
        cut to `max_length - 2`, padded to `max_length` (or to the longest phrase)."""
        texts = self._as_text_list(phrases, "phrases")
        if max_length is not None and max_length < 3:
            raise ValueError(f"`max_length` must be >= 3 (room for [CLS], a piece and [SEP]), got {max_length}.")
        pieces = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        if max_length is not None:
            pieces = [p[: max_length - 2] for p in pieces]
        ids = [[self.tokenizer.cls_token_id, *p, self.tokenizer.sep_token_id] for p in pieces]
        return self._pad(ids, "max_length" if max_length else "longest", max_length, return_tensors)

    def prepare_grounding(
        self,
        images: Any,
        phrases: str | Sequence[str],
        boxes: Any = None,
        max_length: int | None = None,
        return_tensors: str | None = "pt",
    ) -> BatchFeature:
        """Inputs of [`MPLUGForGrounding`]: letterboxed images (see `MPLUGImageProcessor.preprocess_grounding`),
        phrases (`encode_phrases`), and, when `boxes` (pixel `(x1, y1, x2, y2)` in the original images) are given,
        the normalised `(cx, cy, w, h)` targets as `boxes`. `image_geometry` maps predictions back to pixels."""
        visual = self.image_processor.preprocess_grounding(images, return_tensors="pt")
        text = self.encode_phrases(phrases, max_length, return_tensors="pt")
        if len(text["input_ids"]) != len(visual["pixel_values"]):
            raise ValueError(
                f"Batch size mismatch: {len(visual['pixel_values'])} image(s) but {len(text['input_ids'])} phrase(s)."
            )
        data = {**visual, **text}
        if boxes is not None:
            data["boxes"] = self.box_pixels_to_normalized(boxes, visual["image_geometry"])
        return BatchFeature(data=data, tensor_type=return_tensors)

    def box_pixels_to_normalized(self, boxes: Any, image_geometry: torch.Tensor) -> torch.Tensor:
        """Pixel `(x1, y1, x2, y2)` in the original images -> `(cx, cy, w, h)` normalised to the padded square."""
        boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
        geometry = torch.as_tensor(image_geometry, dtype=torch.float32).reshape(-1, 5)
        if boxes.shape[0] != geometry.shape[0]:
            raise ValueError(f"`boxes` has {boxes.shape[0]} boxes for {geometry.shape[0]} images.")
        if bool((boxes[:, 2:] < boxes[:, :2]).any()):
            raise ValueError("`boxes` must be (x1, y1, x2, y2) with x2 >= x1 and y2 >= y1.")
        scale, offset = geometry[:, 2:3], geometry[:, 3:5].repeat(1, 2)
        side = float(self.image_processor.size["height"])
        xyxy = (boxes * scale + offset) / side
        return torch.stack(
            [
                (xyxy[:, 0] + xyxy[:, 2]) / 2,
                (xyxy[:, 1] + xyxy[:, 3]) / 2,
                xyxy[:, 2] - xyxy[:, 0],
                xyxy[:, 3] - xyxy[:, 1],
            ],
            dim=-1,
        )

    def box_normalized_to_pixels(self, boxes: torch.Tensor, image_geometry: torch.Tensor) -> torch.Tensor:
        """Normalised `(cx, cy, w, h)` on the padded square -> pixel `(x1, y1, x2, y2)` in the original images,
        clipped to the image."""
        boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
        geometry = torch.as_tensor(image_geometry, dtype=torch.float32).reshape(-1, 5)
        if boxes.shape[0] != geometry.shape[0]:
            raise ValueError(
                f"`image_geometry` has {geometry.shape[0]} rows for {boxes.shape[0]} boxes; pass the `image_geometry` "
                "of the same `prepare_grounding` batch (one row per image)."
            )
        side = float(self.image_processor.size["height"])
        cx, cy, w, h = (boxes * side).unbind(-1)
        xyxy = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)
        xyxy = (xyxy - geometry[:, 3:5].repeat(1, 2)) / geometry[:, 2:3]
        limits = geometry[:, :2].repeat(1, 2)
        return torch.minimum(xyxy.clamp(min=0), limits)

    def boxes_to_tokens(self, boxes: torch.Tensor) -> torch.Tensor:
        """Normalised `(cx, cy, w, h)` -> coordinate token ids `floor(clamp(v, 0, 1) * (bins - 1)) + start`."""
        boxes = torch.as_tensor(boxes, dtype=torch.float32)
        return boxes_to_coordinate_tokens(boxes, self.coordinate_token_start_id, self.num_coordinate_bins)

    def tokens_to_boxes(self, tokens: torch.Tensor) -> torch.Tensor:
        """Coordinate token ids -> normalised `(cx, cy, w, h)`."""
        return coordinate_tokens_to_boxes(tokens, self.coordinate_token_start_id, self.num_coordinate_bins)

    def post_process_grounding(self, outputs: Any, image_geometry: torch.Tensor) -> list[dict[str, Any]]:
        """[`MPLUGForGrounding.predict_boxes`] output -> `[{"box": [x1, y1, x2, y2] pixels, "score": p}, ...]`."""
        boxes = self.box_normalized_to_pixels(outputs.pred_boxes, image_geometry)
        scores = outputs.scores if outputs.scores is not None else torch.ones(len(boxes))
        return [{"box": box.tolist(), "score": float(score)} for box, score in zip(boxes, scores)]

    # -------------------------------------------------------------------------------------------- decoding
    def decode(self, token_ids: Any, **kwargs: Any) -> str:
        """Decode one sequence as the original evaluation does: `[SEP]`, `[CLS]`, `[PAD]` removed, stripped."""
        if isinstance(token_ids, torch.Tensor):
            token_ids = token_ids.tolist()
        token_ids = [t for t in token_ids if t >= 0]  # -1: the fixtures' / beam outputs' padding
        size = len(self.tokenizer)
        outside = sorted({t for t in token_ids if t >= size})
        if outside:
            raise ValueError(
                f"`token_ids` holds id(s) {outside[:5]} outside the tokenizer's {size} tokens: they come from a model "
                "whose vocabulary is not this tokenizer's. Decode with the processor saved with the model."
            )
        text = self.tokenizer.decode(token_ids, **kwargs)
        for token in _DECODE_STRIP:
            text = text.replace(token, "")
        return text.strip()

    def batch_decode(self, sequences: Any, **kwargs: Any) -> list[str]:
        """[`~MPLUGProcessor.decode`] for each row of `sequences`."""
        if isinstance(sequences, torch.Tensor):
            sequences = sequences.tolist()
        return [self.decode(seq, **kwargs) for seq in sequences]

    @property
    def model_input_names(self) -> list[str]:
        return ["pixel_values", "input_ids", "attention_mask"]


__all__ = ["MPLUGProcessor", "load_vocab"]
