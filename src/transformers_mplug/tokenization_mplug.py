"""Tokenizer of mPLUG: BERT's WordPiece with mPLUG's special-token contract in its post-processor."""

from __future__ import annotations

from typing import Any

from tokenizers import processors
from transformers import BertTokenizer
from transformers.utils import logging

logger = logging.get_logger(__name__)


class MPLUGTokenizer(BertTokenizer):
    r"""
    BERT's WordPiece tokenizer (lower-casing, as bert-base-uncased) with the original mPLUG token contract, applied by
    the tokenizer's own post-processor, so that any code calling the tokenizer (transformers' pipelines included)
    gets the ids the model was trained on:

    - a text (question, caption, prompt) encodes as `[CLS] text`, with **no** trailing `[SEP]`;
    - a target (`text_target=`: answers, captions to learn) encodes as `[CLS] text [SEP]`;
    - a pair (`text`, `text_pair`) encodes as `[CLS] A [SEP] B [SEP]`.

    `token_type_ids` are not returned (mPLUG's encoders do not read them). Everything else is [`BertTokenizer`].

    `end_text_with_sep=True` encodes texts as `[CLS] text [SEP]` too: the contract of ModelScope's mPLUG models
    (`MPlugPreprocessor`), which the converter sets for ModelScope folders; it is saved with the tokenizer.

    Example:
        >>> from transformers_mplug import MPLUGTokenizer
        >>> vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "what", "is", "red"]
        >>> tokenizer = MPLUGTokenizer(vocab={t: i for i, t in enumerate(vocab)})
        >>> tokenizer("What is red")["input_ids"], tokenizer(text_target="red")["input_ids"]
        ([2, 5, 6, 7], [2, 7, 3])
        >>> tokenizer("what", "red")["input_ids"], tokenizer.decode([2, 7, 3], skip_special_tokens=True)
        ([2, 5, 3, 7, 3], 'red')
    """

    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, *args: Any, end_text_with_sep: bool = False, **kwargs: Any) -> None:
        if not isinstance(end_text_with_sep, bool):
            raise TypeError(f"`end_text_with_sep` must be True or False, got {end_text_with_sep!r}.")
        self.end_text_with_sep = end_text_with_sep
        super().__init__(*args, end_text_with_sep=end_text_with_sep, **kwargs)
        self._should_update_post_processor = False  # keep the contract below (not a bos/eos template)
        self._switch_to_input_mode()

    def _template(self, single: str) -> processors.TemplateProcessing:
        cls_token, sep_token = str(self.cls_token), str(self.sep_token)
        return processors.TemplateProcessing(
            single=single.format(cls=cls_token, sep=sep_token),
            pair=f"{cls_token}:0 $A:0 {sep_token}:0 $B:1 {sep_token}:1",
            special_tokens=[(cls_token, self.cls_token_id), (sep_token, self.sep_token_id)],
        )

    def _switch_to_input_mode(self) -> None:
        """Texts: `[CLS] text` (the original mPLUG tokenizer's single-sequence format), or `[CLS] text [SEP]` with
        `end_text_with_sep` (ModelScope's)."""
        sep = " {sep}:0" if getattr(self, "end_text_with_sep", False) else ""
        self._tokenizer.post_processor = self._template("{cls}:0 $A:0" + sep)

    def _switch_to_target_mode(self) -> None:
        """Targets: `[CLS] text [SEP]` (the decoder learns to end with `[SEP]`)."""
        self._tokenizer.post_processor = self._template("{cls}:0 $A:0 {sep}:0")

    def update_post_processor(self) -> None:
        """The contract is fixed; transformers' bos/eos template would replace it."""
        self._switch_to_input_mode()


__all__ = ["MPLUGTokenizer"]
