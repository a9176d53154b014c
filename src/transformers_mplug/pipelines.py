"""`transformers.pipeline(...)` support for mPLUG models, leaving transformers' own pipelines as they are.

Importing `transformers_mplug` adds, through transformers' public `PIPELINE_REGISTRY.register_pipeline`:

- `"visual-grounding"` (new) -> [`MPLUGVisualGroundingPipeline`] for [`MPLUGForGrounding`]: the box of a phrase, in
  pixels of the original image, with a score.
- `"image-captioning"` (new) -> [`MPLUGImageCaptioningPipeline`] for [`MPLUGForCaptioning`]: `[{"generated_text"}]`,
  optional text prompt. transformers' own `"image-text-to-text"` pipeline also drives the captioner when a prompt
  (`text=`) is given.
- `"visual-question-answering"` (alias `"vqa"`) -> [`MPLUGVisualQuestionAnsweringPipeline`], only where transformers
  no longer has the task (5.3+ removed it): the task is registered and its two removal notices are lifted; any model
  other than mPLUG gets transformers' removal message, as before. Where transformers still has the task (5.2.x), its
  own pipeline stays registered: pass `pipeline_class=MPLUGVisualQuestionAnsweringPipeline` for scores and
  `candidate_answers`.

`"zero-shot-image-classification"` is transformers' own pipeline: [`MPLUGForRetrieval`] returns `logits_per_image`
as CLIP does. [`MPLUGZeroShotImageClassificationPipeline`] (`pipeline_class=`) adds the ITM re-ranking option.
The auto classes gain `MPLUGConfig` entries only (`AutoModelForVisualQuestionAnswering`, `AutoModelForImageTextToText`,
`AutoModelForZeroShotImageClassification`).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import (
    AutoModelForImageTextToText,
    AutoModelForVisualQuestionAnswering,
    AutoModelForZeroShotImageClassification,
    Pipeline,
)
from transformers.image_utils import load_image
from transformers.pipelines import PIPELINE_REGISTRY
from transformers.utils import logging

from .configuration_mplug import MPLUGConfig
from .modeling_mplug import (
    MPLUGForCaptioning,
    MPLUGForGrounding,
    MPLUGForQuestionAnswering,
    MPLUGForRetrieval,
    MPLUGPreTrainedModel,
)
from .processing_mplug import MPLUGProcessor

logger = logging.get_logger(__name__)


class _MPLUGPipelineMixin:
    """Dispatch: non-mPLUG models get transformers' own pipeline for the task; mPLUG models get this class."""

    _model_class: type = MPLUGPreTrainedModel
    _task_name: str = ""
    _other_models_message: str = ""  # transformers' own notice for a task it removed

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        model = kwargs.get("model", args[0] if args else None)
        if not isinstance(model, self._model_class):
            if isinstance(model, MPLUGPreTrainedModel):
                raise TypeError(
                    f"The {self._task_name!r} pipeline needs a {self._model_class.__name__}, got {type(model).__name__}."
                )
            notice = f" {self._other_models_message}" if self._other_models_message else ""
            raise TypeError(
                f"{type(self).__name__} ({self._task_name!r}) is transformers_mplug's pipeline for mPLUG models; got "
                f"{type(model).__name__}.{notice}"
            )
        super().__init__(*args, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """Save the model and its processor, so that `pipeline(task, model=save_directory)` rebuilds this pipeline.

        Unlike `Pipeline.save_pretrained` for registered pipelines, the folder does not record the pipeline as remote
        code (`custom_pipelines`, which would require `trust_remote_code=True`): importing transformers_mplug
        registers the task."""
        if os.path.isfile(save_directory):
            raise ValueError(f"`save_directory` ({save_directory}) is a file; pass a folder.")
        os.makedirs(save_directory, exist_ok=True)
        self.model.save_pretrained(save_directory, **kwargs)
        self._mplug_processor().save_pretrained(save_directory, **kwargs)

    def _mplug_processor(self) -> MPLUGProcessor:
        """The pipeline's `MPLUGProcessor` (given, or built from the loaded tokenizer and image processor), checked
        once against the model: a stand-in tokenizer (files missing) or one larger than the model's vocabulary is
        refused."""
        processor = getattr(self, "processor", None)
        if processor is not None and processor is getattr(self, "_checked_processor", None):
            return processor
        source = getattr(self.model, "name_or_path", "") or "the model's folder"
        if processor is None or not hasattr(processor, "encode_text"):
            tokenizer, image_processor = getattr(self, "tokenizer", None), getattr(self, "image_processor", None)
            if tokenizer is None or image_processor is None:
                raise ValueError(
                    "The pipeline needs the model's processor: pass `processor=MPLUGProcessor...` (or `tokenizer=` "
                    "and `image_processor=`), or load the model from a folder saved with its processor."
                )
            try:
                processor = MPLUGProcessor(image_processor=image_processor, tokenizer=tokenizer)
            except ValueError as error:
                raise ValueError(f"The tokenizer loaded for {source} is unusable: {error}") from None
        size, vocab_size = len(processor.tokenizer), self.model.config.text_config.vocab_size
        if size > vocab_size:
            raise ValueError(
                f"The tokenizer given for {source} has {size} tokens, more than the model's vocabulary "
                f"({vocab_size}): it is not the model's tokenizer. Pass the processor saved with the model."
            )
        self.processor = self._checked_processor = processor
        return processor


def _as_image(image: Any, timeout: float | None) -> Any:
    return load_image(image, timeout=timeout) if isinstance(image, str) else image


class MPLUGVisualQuestionAnsweringPipeline(_MPLUGPipelineMixin, Pipeline):
    r"""
    Visual question answering with [`MPLUGForQuestionAnswering`].

    `vqa(image, question, top_k=1)` -> `[{"answer": str, "score": float}]`: free generation (beam search; `score`
    is the answer's probability under the model). With `candidate_answers=[...]` the answers are ranked in the
    closed vocabulary as the original (`k` pre-selected by first-token probability), `score` = the re-ranked
    probability. Generation arguments (`num_beams`, `max_new_tokens`, ...) pass through.

    Several questions: `vqa(image, [q1, q2])` asks both about one image, `vqa([im1, im2], q)` asks one question about
    both, `vqa([im1, im2], [q1, q2])` pairs them (one answer list per pair; transformers' own 5.2 pipeline takes the
    Cartesian product instead), and a list of `{"image", "question"}` dicts (or a dataset of them) is answered row by
    row. With `batch_size=N`, N questions go through one `generate` (questions padded, their padding masked; an image
    asked several questions in a batch is encoded once), with the answers and scores of one-by-one calls.

    Example:

    ```python
    >>> import transformers_mplug  # registers the task
    >>> from transformers import pipeline
    >>> vqa = pipeline("visual-question-answering", model="path/to/mplug-vqa")  # doctest: +SKIP
    >>> vqa(image, ["what colour is the circle?", "how many squares?"], batch_size=2)  # doctest: +SKIP
    [[{'answer': 'red', 'score': 0.91}], [{'answer': '2', 'score': 0.84}]]
    ```
    """

    _model_class = MPLUGForQuestionAnswering
    _task_name = "visual-question-answering"
    # `processor=` alone is enough: the tokenizer and image processor are then taken from it
    _load_processor = None
    _load_image_processor = None
    _load_feature_extractor = False
    _load_tokenizer = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        processor = getattr(self, "processor", None)
        # batching (`batch_size=`) collates with the pipeline's tokenizer (its pad id) and image processor
        if getattr(self, "tokenizer", None) is None and getattr(processor, "tokenizer", None) is not None:
            self.tokenizer = processor.tokenizer
        if getattr(self, "image_processor", None) is None and getattr(processor, "image_processor", None) is not None:
            self.image_processor = processor.image_processor

    def __call__(self, image: Any, question: str | list[str] | None = None, **kwargs: Any):
        if question is None:
            if isinstance(image, dict) or (isinstance(image, (list, tuple)) and image and isinstance(image[0], dict)):
                return super().__call__(list(image) if isinstance(image, tuple) else image, **kwargs)
            if isinstance(image, (list, tuple, str, torch.Tensor)) or hasattr(image, "shape") or hasattr(image, "mode"):
                raise ValueError(
                    "Pass a `question` (a string or a list of strings) with the image, or `{'image', 'question'}` "
                    "dicts."
                )
            return super().__call__(image, **kwargs)  # a dataset / generator of {"image", "question"} rows
        many_images, many_questions = isinstance(image, (list, tuple)), isinstance(question, (list, tuple))
        questions = list(question) if many_questions else [question]
        if not questions or not all(isinstance(q, str) for q in questions):
            raise TypeError(f"`question` must be a string or a non-empty list of strings, got {question!r}.")
        images = list(image) if many_images else [image]
        if not images:
            raise ValueError("`image` is an empty list: pass at least one image.")
        if many_images and many_questions and len(images) != len(questions):
            raise ValueError(
                f"`image` ({len(images)}) and `question` ({len(questions)}) lists must have the same length: pair "
                "them one to one, or pass one image (or one question) to ask about all."
            )
        if not (many_images or many_questions):
            return super().__call__({"image": image, "question": question}, **kwargs)
        count = max(len(images), len(questions))
        rows = [
            {"image": images[i if many_images else 0], "question": questions[i if many_questions else 0]}
            for i in range(count)
        ]
        return super().__call__(rows, **kwargs)

    def _sanitize_parameters(
        self,
        top_k: int | None = None,
        candidate_answers: list[str] | None = None,
        k: int = 128,
        timeout: float | None = None,
        truncation: bool | None = None,
        max_length: int | None = None,
        **generate_kwargs: Any,
    ):
        if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"`top_k` must be a positive int, got {top_k!r}.")
        forward = {"generate_kwargs": generate_kwargs, "top_k": top_k or 1}
        postprocess = {}
        if candidate_answers is not None:
            if not candidate_answers or not all(isinstance(a, str) and a.strip() for a in candidate_answers):
                raise ValueError("`candidate_answers` must be a non-empty list of non-empty strings.")
            forward.update(candidate_answers=list(candidate_answers), k=k)
            postprocess["candidate_answers"] = list(candidate_answers)
        return {"timeout": timeout, "truncation": truncation, "max_length": max_length}, forward, postprocess

    def preprocess(
        self, inputs: dict, timeout: float | None = None, truncation: bool | None = None, max_length: int | None = None
    ):
        if not isinstance(inputs, dict) or not {"image", "question"} <= set(inputs):
            raise ValueError(f"Each input must be a dict with 'image' and 'question', got {type(inputs).__name__}.")
        if not isinstance(inputs["question"], str):
            raise TypeError(f"'question' must be a string, got {type(inputs['question']).__name__}.")
        processor = self._mplug_processor()
        return processor(
            images=_as_image(inputs["image"], timeout),
            text=inputs["question"],
            truncation=truncation,
            max_length=max_length,
        )

    def _forward(self, model_inputs, generate_kwargs=None, top_k: int = 1, candidate_answers=None, k: int = 128):
        input_ids, attention_mask = _right_aligned(model_inputs["input_ids"], model_inputs.get("attention_mask"))
        model_inputs = {**self._images_once(model_inputs["pixel_values"]), "input_ids": input_ids}
        if attention_mask is not None:
            model_inputs["attention_mask"] = attention_mask
        batch_size = input_ids.shape[0]
        if candidate_answers is not None:
            candidates = self._mplug_processor().encode_text(candidate_answers, add_eos=True)
            ranked = self.model.rank_answers(candidates["input_ids"], candidates["attention_mask"], k=k, **model_inputs)
            return {"indices": ranked.indices[:, :top_k], "scores": ranked.probabilities[:, :top_k].float()}
        generate_kwargs = dict(generate_kwargs or {})
        num_beams = generate_kwargs.get("num_beams", self.model.generation_config.num_beams or 1)
        if top_k > num_beams:
            raise ValueError(f"`top_k` ({top_k}) cannot exceed `num_beams` ({num_beams}) for generated answers.")
        out = self.model.generate(
            **model_inputs,
            num_return_sequences=top_k,
            output_scores=True,
            return_dict_in_generate=True,
            **generate_kwargs,
        )
        transition = self.model.text_decoder.compute_transition_scores(
            out.sequences, out.scores, getattr(out, "beam_indices", None), normalize_logits=num_beams == 1
        )
        new_tokens = out.sequences[:, 1:]
        # keep up to and including the first [SEP]; a hypothesis that ends earlier than the batch is padded after it
        is_eos = new_tokens == self.model.config.eos_token_id
        valid = (is_eos.long().cumsum(1) - is_eos.long()) == 0
        log_probs = (transition.float() * valid[:, : transition.shape[1]]).sum(1)
        return {
            "sequences": out.sequences.view(batch_size, top_k, -1),
            "scores": log_probs.exp().view(batch_size, top_k),
        }

    def _images_once(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        """`pixel_values`, or, when a batch asks several questions about one image, `image_embeds` with each distinct
        image encoded once."""
        if pixel_values.shape[0] < 2:
            return {"pixel_values": pixel_values}
        unique, inverse = torch.unique(pixel_values.flatten(1), dim=0, return_inverse=True)
        if unique.shape[0] == pixel_values.shape[0]:
            return {"pixel_values": pixel_values}
        embeds = self.model.mplug.encode_image(unique.view(-1, *pixel_values.shape[1:]))[1]
        return {"image_embeds": embeds[inverse]}

    def postprocess(self, model_outputs, candidate_answers: list[str] | None = None):
        scores = model_outputs["scores"][0].tolist()  # this question's row (a batch is unrolled row by row)
        if candidate_answers is not None:
            answers = [candidate_answers[i] for i in model_outputs["indices"][0].tolist()]
        else:
            answers = self._mplug_processor().batch_decode(model_outputs["sequences"][0])
        results = [{"answer": a, "score": float(s)} for a, s in zip(answers, scores)]
        return sorted(results, key=lambda r: r["score"], reverse=True)


def _right_aligned(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows whose padding comes first (a tokenizer with `padding_side="left"`) moved to right padding: the text
    encoder's absolute positions then start at each question's first token, as for a question alone."""
    if attention_mask is None or not bool((attention_mask[:, :1] == 0).any()):
        return input_ids, attention_mask
    order = (attention_mask == 0).long().argsort(dim=1, stable=True)  # real tokens first, in their order
    return input_ids.gather(1, order), attention_mask.gather(1, order)


class MPLUGImageCaptioningPipeline(_MPLUGPipelineMixin, Pipeline):
    r"""
    Image captioning with [`MPLUGForCaptioning`] (task `"image-captioning"`): `captioner(image, text=None)` ->
    `[{"generated_text": caption}]`; `text` is an optional prompt (e.g. `"a picture of"`), kept in the caption.
    """

    _model_class = MPLUGForCaptioning
    _task_name = "image-captioning"
    _load_processor = True
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = False

    def __call__(self, images: Any = None, text: str | None = None, **kwargs: Any):
        if images is None:
            images = kwargs.pop("image", None)
        if images is None:
            raise ValueError("Pass an image (`images=`).")
        if isinstance(images, list) and images and not isinstance(images[0], (list, tuple)):
            return [self(image, text, **kwargs) for image in images]
        return super().__call__({"image": images, "text": text}, **kwargs)

    def _sanitize_parameters(
        self,
        timeout: float | None = None,
        max_new_tokens: int | None = None,
        generate_kwargs: dict | None = None,
        **kwargs: Any,
    ):
        forward = dict(generate_kwargs or {})
        forward.update(kwargs)
        if max_new_tokens is not None:
            forward["max_new_tokens"] = max_new_tokens
        return {"timeout": timeout}, {"generate_kwargs": forward}, {}

    def preprocess(self, inputs: dict, timeout: float | None = None):
        processor = self._mplug_processor()
        image = inputs["image"]
        image = (
            [_as_image(f, timeout) for f in image] if isinstance(image, (list, tuple)) else _as_image(image, timeout)
        )
        key = "videos" if isinstance(image, (list, tuple)) else "images"
        batch = processor(**{key: image})
        if inputs["text"]:
            batch["input_ids"] = processor.encode_text(inputs["text"])["input_ids"]
        return batch

    def _forward(self, model_inputs, generate_kwargs=None):
        sequences = self.model.generate(
            pixel_values=model_inputs["pixel_values"],
            input_ids=model_inputs.get("input_ids"),
            **(generate_kwargs or {}),
        )
        return {"sequences": sequences}

    def postprocess(self, model_outputs):
        processor = self._mplug_processor()
        return [{"generated_text": text} for text in processor.batch_decode(model_outputs["sequences"])]


class MPLUGZeroShotImageClassificationPipeline(_MPLUGPipelineMixin, Pipeline):
    r"""
    Zero-shot image classification with [`MPLUGForRetrieval`], with an ITM option (transformers' own
    `"zero-shot-image-classification"` pipeline gives the ITC scores; use this one through
    `pipeline("zero-shot-image-classification", model=..., pipeline_class=MPLUGZeroShotImageClassificationPipeline)`):
    `classifier(image, candidate_labels=[...],
    hypothesis_template="a picture of {}.")` -> `[{"label", "score"}]`, scores = softmax over the labels of the ITC
    similarity / temperature; `use_itm=True` uses the ITM match logits of (image, hypothesis) pairs instead.
    """

    _model_class = MPLUGForRetrieval
    _task_name = "zero-shot-image-classification"
    _load_processor = False
    _load_image_processor = True
    _load_feature_extractor = False
    _load_tokenizer = True

    def __call__(self, image: Any, candidate_labels: list[str] | None = None, **kwargs: Any):
        if candidate_labels is None:
            candidate_labels = kwargs.pop("candidate_labels", None)
        if not candidate_labels:
            raise ValueError("Pass `candidate_labels` (a non-empty list of strings).")
        if isinstance(image, list):
            return [self(img, candidate_labels, **kwargs) for img in image]
        return super().__call__({"image": image, "labels": list(candidate_labels)}, **kwargs)

    def _sanitize_parameters(
        self,
        hypothesis_template: str = "a picture of {}.",
        use_itm: bool = False,
        timeout: float | None = None,
        **kwargs: Any,
    ):
        if kwargs:
            raise TypeError(f"Unexpected argument(s) {sorted(kwargs)}.")
        if "{}" not in hypothesis_template:
            raise ValueError("`hypothesis_template` must contain '{}' where the label goes.")
        return {"hypothesis_template": hypothesis_template, "timeout": timeout}, {"use_itm": use_itm}, {}

    def preprocess(self, inputs: dict, hypothesis_template: str = "a picture of {}.", timeout: float | None = None):
        processor = self._mplug_processor()
        batch = processor(images=_as_image(inputs["image"], timeout))
        texts = processor.encode_text([hypothesis_template.format(label) for label in inputs["labels"]])
        batch.update(texts)
        batch["candidate_labels"] = inputs["labels"]
        return batch

    def _forward(self, model_inputs, use_itm: bool = False):
        labels = model_inputs.pop("candidate_labels")
        ids, mask = model_inputs["input_ids"], model_inputs["attention_mask"]
        _, image_embeds = self.model.mplug.encode_image(model_inputs["pixel_values"])
        if use_itm:
            expanded = image_embeds.expand(len(labels), -1, -1)
            logits = self.model.match_pairs(image_embeds=expanded, input_ids=ids, attention_mask=mask)[:, 1]
        else:
            image_features = self.model.get_image_features(image_embeds=image_embeds).pooler_output
            text_features = self.model.get_text_features(ids, mask).pooler_output
            logits = (image_features @ text_features.t())[0] / self.model.temp
        return {"labels": labels, "scores": logits.float().softmax(-1).tolist()}

    def postprocess(self, model_outputs):
        results = [{"score": s, "label": label} for s, label in zip(model_outputs["scores"], model_outputs["labels"])]
        return sorted(results, key=lambda r: r["score"], reverse=True)


class MPLUGVisualGroundingPipeline(_MPLUGPipelineMixin, Pipeline):
    r"""
    Visual grounding with [`MPLUGForGrounding`] (task `"visual-grounding"`, registered by this package):
    `grounder(image, phrase)` -> `{"box": {"xmin", "ymin", "xmax", "ymax"}, "score"}` in pixels of the original
    image (the original's letterbox preprocessing is undone); `score` = joint probability of the 4 coordinate tokens.
    """

    _model_class = MPLUGForGrounding
    _task_name = "visual-grounding"
    _load_processor = None
    _load_image_processor = True
    _load_feature_extractor = False
    _load_tokenizer = True

    def __call__(self, image: Any, phrase: str | list[str] | None = None, **kwargs: Any):
        if phrase is None:
            raise ValueError("Pass the referring expression as `phrase`.")
        if isinstance(image, list) or isinstance(phrase, list):
            images = image if isinstance(image, list) else [image] * len(phrase)
            phrases = phrase if isinstance(phrase, list) else [phrase] * len(images)
            if len(images) != len(phrases):
                raise ValueError("`image` and `phrase` lists must have the same length.")
            return [self(i, p, **kwargs) for i, p in zip(images, phrases)]
        return super().__call__({"image": image, "phrase": phrase}, **kwargs)

    def _sanitize_parameters(self, timeout: float | None = None, max_length: int | None = None, **kwargs: Any):
        if kwargs:
            raise TypeError(f"Unexpected argument(s) {sorted(kwargs)}.")
        return {"timeout": timeout, "max_length": max_length}, {}, {}

    def preprocess(self, inputs: dict, timeout: float | None = None, max_length: int | None = None):
        processor = self._mplug_processor()
        return processor.prepare_grounding(_as_image(inputs["image"], timeout), inputs["phrase"], max_length=max_length)

    def _forward(self, model_inputs):
        prediction = self.model.predict_boxes(
            model_inputs["pixel_values"], model_inputs["input_ids"], model_inputs["attention_mask"]
        )
        return {"prediction": prediction, "image_geometry": model_inputs["image_geometry"]}

    def postprocess(self, model_outputs):
        processor = self._mplug_processor()
        result = processor.post_process_grounding(model_outputs["prediction"], model_outputs["image_geometry"])[0]
        xmin, ymin, xmax, ymax = result["box"]
        return {"box": {"xmin": xmin, "ymin": ymin, "xmax": xmax, "ymax": ymax}, "score": result["score"]}


def register_pipelines() -> None:
    """Register the mPLUG pipelines and auto-model entries with transformers (called on import; see the module
    docstring for what is and is not touched)."""
    from transformers import pipelines as transformers_pipelines

    AutoModelForVisualQuestionAnswering.register(MPLUGConfig, MPLUGForQuestionAnswering, exist_ok=True)
    AutoModelForImageTextToText.register(MPLUGConfig, MPLUGForCaptioning, exist_ok=True)
    AutoModelForZeroShotImageClassification.register(MPLUGConfig, MPLUGForRetrieval, exist_ok=True)

    entries = [
        ("visual-grounding", MPLUGVisualGroundingPipeline, MPLUGForGrounding),
        ("image-captioning", MPLUGImageCaptioningPipeline, AutoModelForImageTextToText),
    ]
    removed = getattr(transformers_pipelines, "REMOVED_TASKS", {})
    vqa = "visual-question-answering"
    if vqa not in PIPELINE_REGISTRY.supported_tasks:  # transformers >= 5.3 removed the task
        notice = removed.pop(vqa, None)
        removed.pop("vqa", None)
        if notice and not MPLUGVisualQuestionAnsweringPipeline._other_models_message:
            MPLUGVisualQuestionAnsweringPipeline._other_models_message = (
                f"transformers removed the {vqa!r} task for other models: {notice}"
            )
        PIPELINE_REGISTRY.task_aliases.setdefault("vqa", vqa)
        entries.append((vqa, MPLUGVisualQuestionAnsweringPipeline, AutoModelForVisualQuestionAnswering))
    for task, pipeline_class, model_class in entries:
        current = PIPELINE_REGISTRY.supported_tasks.get(task)
        if current is not None:
            if current.get("impl") is not pipeline_class:
                logger.warning("transformers already has a %r pipeline; transformers_mplug leaves it in place.", task)
            continue
        PIPELINE_REGISTRY.register_pipeline(
            task, pipeline_class=pipeline_class, pt_model=model_class, type="multimodal"
        )


__all__ = [
    "MPLUGVisualQuestionAnsweringPipeline",
    "MPLUGImageCaptioningPipeline",
    "MPLUGZeroShotImageClassificationPipeline",
    "MPLUGVisualGroundingPipeline",
    "register_pipelines",
]
