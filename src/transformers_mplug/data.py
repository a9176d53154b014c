"""Data for training and evaluating mPLUG: an embedded procedural dataset and processor-driven collators.

The embedded dataset ("shapes") draws coloured shapes on a canvas and asks about them (colour, shape, count,
position, yes/no), with captions and boxes from the same scenes, deterministically from a seed: it lets every
example and test run offline.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image, ImageDraw

from .processing_mplug import MPLUGProcessor

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30)}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}


def draw_scene(objects: Sequence[dict[str, Any]], size: int) -> Image.Image:
    """Draw `objects` (`{"color", "shape", "cell"}`, cell 0..3 of a 2x2 grid) on a light grey canvas."""
    image = Image.new("RGB", (size, size), (235, 235, 235))
    draw = ImageDraw.Draw(image)
    half = size // 2
    margin = max(2, size // 16)
    for obj in objects:
        x0, y0 = (obj["cell"] % 2) * half + margin, (obj["cell"] // 2) * half + margin
        x1, y1 = x0 + half - 2 * margin, y0 + half - 2 * margin
        color = COLORS[obj["color"]]
        if obj["shape"] == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=color)
        elif obj["shape"] == "square":
            draw.rectangle((x0, y0, x1, y1), fill=color)
        else:
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=color)
    return image


def _object_box(obj: dict[str, Any], size: int) -> list[float]:
    half = size // 2
    margin = max(2, size // 16)
    x0, y0 = (obj["cell"] % 2) * half + margin, (obj["cell"] // 2) * half + margin
    return [float(x0), float(y0), float(x0 + half - 2 * margin), float(y0 + half - 2 * margin)]


def _scene(rng: random.Random) -> list[dict[str, Any]]:
    count = rng.randint(1, 3)
    cells = rng.sample(range(4), count)
    return [{"color": rng.choice(list(COLORS)), "shape": rng.choice(SHAPES), "cell": cell} for cell in cells]


QUESTION_KINDS = ("count", "exists", "color", "shape", "where")


def _names_uniquely(kind: str, target: dict[str, Any], objects: list[dict[str, Any]]) -> bool:
    """Whether a question of `kind` about `target` names it unambiguously (by shape, colour, or both)."""
    keys = {"color": ("shape",), "shape": ("color",), "where": ("color", "shape")}.get(kind)
    return keys is None or sum(all(o[k] == target[k] for k in keys) for o in objects) == 1


def _askable(kind: str, objects: list[dict[str, Any]]) -> bool:
    """Whether the scene has an object that a question of `kind` can name unambiguously."""
    return any(_names_uniquely(kind, target, objects) for target in objects)


def _question(
    objects: list[dict[str, Any]], rng: random.Random, kinds: Sequence[str] = QUESTION_KINDS
) -> tuple[str, str, list[str], list[float]]:
    """A question of one of `kinds` about the scene: its kind, text, answers and VQA-style soft scores."""
    while True:
        kind = rng.choice(kinds)
        target = rng.choice(objects)
        if kind == "count":
            n = len(objects)
            return kind, "how many shapes are there?", [NUMBER_WORDS[n], str(n)], [1.0, 0.3]
        if kind == "exists":
            color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
            if rng.random() < 0.5:
                color, shape = target["color"], target["shape"]
            present = any(o["color"] == color and o["shape"] == shape for o in objects)
            return kind, f"is there a {color} {shape}?", ["yes" if present else "no"], [1.0]
        if not _names_uniquely(kind, target, objects):
            continue
        if kind == "color":
            return kind, f"what color is the {target['shape']}?", [target["color"]], [1.0]
        if kind == "shape":
            return kind, f"what shape is the {target['color']} object?", [target["shape"]], [1.0]
        return kind, f"where is the {target['color']} {target['shape']}?", [POSITIONS[target["cell"]]], [1.0]


def _caption(objects: list[dict[str, Any]], positions: bool = False) -> str:
    parts = [
        f"a {o['color']} {o['shape']}" + (f" at the {POSITIONS[o['cell']]}" if positions else "")
        for o in sorted(objects, key=lambda o: o["cell"])
    ]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


DESCRIBE_QUESTION = "what is in the picture?"


def shapes_examples(
    num_examples: int,
    seed: int = 0,
    image_size: int = 64,
    describe: bool = False,
    describe_weight: float = 1.0,
    questions_per_scene: int = 1,
) -> list[dict[str, Any]]:
    """Rows of the embedded dataset: `image`, `question`, `answers`, `answer_weights`, `vqa_answers` (10 human-style
    answers for the official VQA accuracy), `caption`, `description` (the caption with each object's position),
    `phrase`, `box` (pixel `x1, y1, x2, y2` of the phrase).

    With `describe=True` every scene also gets a row asking "what is in the picture?" answered by a description
    naming every object's colour, shape and position (a dense training signal). `questions_per_scene` asks up to that
    many questions of different kinds about each scene (as VQA asks several questions per image)."""
    if num_examples < 1:
        raise ValueError(f"`num_examples` must be >= 1, got {num_examples}.")
    if not 1 <= questions_per_scene <= len(QUESTION_KINDS):
        raise ValueError(
            f"`questions_per_scene` must be between 1 and {len(QUESTION_KINDS)} (one per question kind), "
            f"got {questions_per_scene}."
        )
    rng = random.Random(seed)
    rows = []
    for _ in range(num_examples):
        objects = _scene(rng)
        questions = [_question(objects, rng)]
        target = rng.choice(objects)
        phrase = f"the {target['color']} {target['shape']}"
        if sum(o["color"] == target["color"] and o["shape"] == target["shape"] for o in objects) > 1:
            phrase += f" at the {POSITIONS[target['cell']]}"
        for _ in range(questions_per_scene - 1):
            asked = {kind for kind, *_ in questions}
            kinds = [kind for kind in QUESTION_KINDS if kind not in asked and _askable(kind, objects)]
            if not kinds:
                break
            questions.append(_question(objects, rng, kinds))
        image = draw_scene(objects, image_size)
        scene = {
            "image": image,
            "caption": _caption(objects),
            "description": _caption(objects, positions=True),
            "phrase": phrase,
            "box": _object_box(target, image_size),
        }
        if describe:
            rows.append(
                {
                    **scene,
                    "question": DESCRIBE_QUESTION,
                    "answers": [scene["description"]],
                    "answer_weights": [describe_weight],
                    "vqa_answers": [scene["description"]] * 10,
                    "phrase": "",
                    "box": [0.0] * 4,
                }
            )
        for _, question, answers, weights in questions:
            human = [answers[0]] * 10 if len(answers) == 1 else [answers[0]] * 7 + [answers[1]] * 3
            rows.append(
                {**scene, "question": question, "answers": answers, "answer_weights": weights, "vqa_answers": human}
            )
    return rows


def load_shapes_dataset(
    num_train: int = 2000,
    num_eval: int = 200,
    seed: int = 0,
    image_size: int = 64,
    describe: bool = False,
    describe_weight: float = 1.0,
    questions_per_scene: int = 1,
):
    """The embedded dataset as a `datasets.DatasetDict` with `train` and `validation` splits (different seeds);
    `describe` and `questions_per_scene` shape the training split only (validation asks one question per scene)."""
    try:
        import datasets
    except ImportError as error:  # pragma: no cover - the training extra installs it
        raise ImportError("The embedded dataset needs `datasets`: pip install 'transformers-mplug[train]'.") from error
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "question": datasets.Value("string"),
            "answers": datasets.Sequence(datasets.Value("string")),
            "answer_weights": datasets.Sequence(datasets.Value("float32")),
            "vqa_answers": datasets.Sequence(datasets.Value("string")),
            "caption": datasets.Value("string"),
            "description": datasets.Value("string"),
            "phrase": datasets.Value("string"),
            "box": datasets.Sequence(datasets.Value("float32")),
        }
    )

    def split(count: int, split_seed: int, training: bool):
        rows = shapes_examples(
            count,
            split_seed,
            image_size,
            describe=describe and training,
            describe_weight=describe_weight,
            questions_per_scene=questions_per_scene if training else 1,
        )
        return datasets.Dataset.from_list(rows, features=features)

    return datasets.DatasetDict({"train": split(num_train, seed, True), "validation": split(num_eval, seed + 1, False)})


ENTAILMENT_LABELS = ("entailment", "neutral", "contradiction")


def _hypothesis(objects: list[dict[str, Any]], label: str, rng: random.Random) -> str:
    present = {(o["color"], o["shape"]) for o in objects}
    absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
    if label == "neutral":  # what is behind a visible shape cannot be seen
        (c, s), (c2, s2) = rng.choice(sorted(present)), (rng.choice(list(COLORS)), rng.choice(SHAPES))
        return f"there is a {c2} {s2} behind the {c} {s}"
    if rng.random() < 0.3:
        count = len(objects) if label == "entailment" else rng.choice([n for n in NUMBER_WORDS if n != len(objects)])
        return f"there are {NUMBER_WORDS[count]} shapes" if count > 1 else "there is one shape"
    if label == "entailment":
        c, s = rng.choice(sorted(present))
        return f"there is a {c} {s}"
    if rng.random() < 0.5:  # a claim about something behind a shape that is not there
        (c, s), (c2, s2) = rng.choice(absent), (rng.choice(list(COLORS)), rng.choice(SHAPES))
        return f"there is a {c2} {s2} behind the {c} {s}"
    c, s = rng.choice(absent)
    return f"there is a {c} {s}"


def shapes_entailment_examples(num_examples: int, seed: int = 0, image_size: int = 64) -> list[dict[str, Any]]:
    """Image-text entailment rows of the embedded scenes (SNLI-VE style): `image`, `hypothesis`, `label` (0
    entailment, 1 neutral, 2 contradiction; balanced) and `label_name`. Existence and count claims are entailed or
    contradicted by the picture; "there is an X behind the Y" is neutral when Y is visible (what is behind it cannot
    be seen) and a contradiction when it is not."""
    if num_examples < 1:
        raise ValueError(f"`num_examples` must be >= 1, got {num_examples}.")
    rng = random.Random(seed)
    rows = []
    for index in range(num_examples):
        objects = _scene(rng)
        label = ENTAILMENT_LABELS[index % 3]
        rows.append(
            {
                "image": draw_scene(objects, image_size),
                "hypothesis": _hypothesis(objects, label, rng),
                "label": ENTAILMENT_LABELS.index(label),
                "label_name": label,
            }
        )
    rng.shuffle(rows)
    return rows


def load_shapes_entailment_dataset(num_train: int = 2000, num_eval: int = 300, seed: int = 0, image_size: int = 64):
    """[`shapes_entailment_examples`] as a `datasets.DatasetDict` (`train`, `validation`; different seeds)."""
    import datasets

    features = datasets.Features(
        {
            "image": datasets.Image(),
            "hypothesis": datasets.Value("string"),
            "label": datasets.ClassLabel(names=list(ENTAILMENT_LABELS)),
            "label_name": datasets.Value("string"),
        }
    )
    return datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(
                shapes_entailment_examples(num_train, seed, image_size), features=features
            ),
            "validation": datasets.Dataset.from_list(
                shapes_entailment_examples(num_eval, seed + 1, image_size), features=features
            ),
        }
    )


def _pair_sentence(left: list[dict[str, Any]], right: list[dict[str, Any]], rng: random.Random) -> tuple[str, bool]:
    kind = rng.choice(["more", "fewer", "both", "left", "right"])
    if kind in ("more", "fewer"):
        shape = rng.choice(SHAPES)
        n_left = sum(o["shape"] == shape for o in left)
        n_right = sum(o["shape"] == shape for o in right)
        truth = n_left > n_right if kind == "more" else n_left < n_right
        return f"the left image has {kind} {shape}s than the right image", truth
    obj = rng.choice(left + right)
    if rng.random() < 0.5:  # about half of the claims name a colour/shape drawn at random
        obj = {"color": rng.choice(list(COLORS)), "shape": rng.choice(SHAPES)}

    def has(objects):
        return any(o["color"] == obj["color"] and o["shape"] == obj["shape"] for o in objects)

    if kind == "both":
        return f"both images have a {obj['color']} {obj['shape']}", has(left) and has(right)
    side = left if kind == "left" else right
    return f"the {kind} image has a {obj['color']} {obj['shape']}", has(side)


def shapes_pair_examples(num_examples: int, seed: int = 0, image_size: int = 64) -> list[dict[str, Any]]:
    """NLVR2-style rows of the embedded scenes: `left`, `right` (images), `sentence` (e.g. "the left image has more
    circles than the right image", "both images have a red square") and `label` (1 true, 0 false; balanced)."""
    if num_examples < 1:
        raise ValueError(f"`num_examples` must be >= 1, got {num_examples}.")
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    wanted = [index % 2 == 0 for index in range(num_examples)]
    for truth in wanted:
        while True:
            left, right = _scene(rng), _scene(rng)
            sentence, value = _pair_sentence(left, right, rng)
            if value == truth:
                break
        rows.append(
            {
                "left": draw_scene(left, image_size),
                "right": draw_scene(right, image_size),
                "sentence": sentence,
                "label": int(truth),
            }
        )
    rng.shuffle(rows)
    return rows


def shapes_vocabulary() -> list[str]:
    """Every word of the embedded dataset (questions, answers, captions, phrases)."""
    words = set(COLORS) | set(SHAPES) | set(NUMBER_WORDS.values()) | {"yes", "no", "and", "a", "the", "at"}
    words |= {w for p in POSITIONS for w in p.split()}
    words |= set("how many shapes are there is what color shape object where".split())
    words |= {str(n) for n in NUMBER_WORDS} | {"?", ",", "in", "picture", "behind"}
    words |= set("image images has have more than both fewer".split()) | {f"{s}s" for s in SHAPES}
    return sorted(words)


# ------------------------------------------------------------------------------------------------ collators
def _column(rows: list[dict[str, Any]], name: str) -> list[Any]:
    for index, row in enumerate(rows):
        if name not in row:
            raise KeyError(f"Example {index} has no `{name}` column (columns: {sorted(row)}).")
    return [row[name] for row in rows]


class MPLUGVQACollator:
    """Batches VQA rows (`image`, `question`, `answers`, optional `answer_weights`) for
    [`MPLUGForQuestionAnswering`]: every answer of a question is a target with its weight, as the original.
    The batch holds `pixel_values`, `input_ids`, `attention_mask`, `labels` (all answers), `answer_weights` and
    `answers_per_question`, the arguments of the model's forward.
    """

    def __init__(
        self,
        processor: MPLUGProcessor,
        image_column: str = "image",
        question_column: str = "question",
        answers_column: str = "answers",
        weights_column: str = "answer_weights",
        max_length: int = 25,
    ):
        self.processor = processor
        self.columns = (image_column, question_column, answers_column, weights_column)
        self.max_length = max_length

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        image_column, question_column, answers_column, weights_column = self.columns
        images = _column(rows, image_column)
        questions = _column(rows, question_column)
        answers, weights, counts = [], [], []
        for index, row in enumerate(rows):
            row_answers = row.get(answers_column)
            if isinstance(row_answers, str):
                row_answers = [row_answers]
            if not row_answers or not all(isinstance(a, str) and a.strip() for a in row_answers):
                raise ValueError(f"Example {index}: `{answers_column}` must hold at least one non-empty answer.")
            row_weights = row.get(weights_column) or [1.0] * len(row_answers)
            if len(row_weights) != len(row_answers):
                raise ValueError(f"Example {index}: `{weights_column}` and `{answers_column}` differ in length.")
            answers += list(row_answers)
            weights += [float(w) for w in row_weights]
            counts.append(len(row_answers))
        batch = self.processor(images=images, text=questions, truncation=True, max_length=self.max_length)
        batch["labels"] = self.processor.encode_labels(answers)
        batch["answer_weights"] = torch.tensor(weights)
        batch["answers_per_question"] = torch.tensor(counts)
        return dict(batch)


class MPLUGCaptioningCollator:
    """Batches captioning rows (`image`, `caption`) for [`MPLUGForCaptioning`], with an optional prompt whose
    tokens get no loss."""

    def __init__(
        self,
        processor: MPLUGProcessor,
        image_column: str = "image",
        caption_column: str = "caption",
        prompt: str = "",
        max_length: int = 25,
    ):
        self.processor = processor
        self.columns = (image_column, caption_column)
        self.prompt = prompt.strip()
        self.prompt_length = (
            len(processor.encode_text(self.prompt, return_tensors=None)["input_ids"][0]) if self.prompt else 1
        )
        if not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"`max_length` must be an int >= 2 ([CLS] and one caption token), got {max_length!r}.")
        if self.prompt_length >= max_length:
            raise ValueError(
                f"The prompt {self.prompt!r} takes {self.prompt_length} tokens with [CLS], which leaves no caption "
                f"token within `max_length` {max_length} (every label would be ignored and the loss 0); raise "
                "`max_length` or shorten the prompt."
            )
        self.max_length = max_length

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        image_column, caption_column = self.columns
        captions = _column(rows, caption_column)
        for index, caption in enumerate(captions):
            if not isinstance(caption, str) or not caption.strip():
                raise ValueError(f"Example {index}: `{caption_column}` is empty.")
        texts = [f"{self.prompt} {c}".strip() for c in captions]
        batch = self.processor(images=_column(rows, image_column))
        encoded = self.processor.encode_text(texts, add_eos=True, truncation=True, max_length=self.max_length)
        labels = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100)
        labels[:, : self.prompt_length] = -100  # no loss on [CLS] and the prompt
        batch.update(encoded)
        batch["labels"] = labels
        return dict(batch)


def _texts(rows: list[dict[str, Any]], name: str) -> list[str]:
    texts = _column(rows, name)
    for index, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"Example {index}: `{name}` is empty.")
    return texts


class MPLUGRetrievalCollator:
    """Batches image-text rows for [`MPLUGForRetrieval`] training: images, `[CLS] text` ids, optional image ids
    (`idx`: texts of one image are ITC positives and never ITM negatives) and `return_loss=True`."""

    def __init__(
        self,
        processor: MPLUGProcessor,
        image_column: str = "image",
        text_column: str = "caption",
        idx_column: str | None = None,
        max_length: int = 30,
    ):
        self.processor = processor
        self.columns = (image_column, text_column, idx_column)
        self.max_length = max_length

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        image_column, text_column, idx_column = self.columns
        texts = _texts(rows, text_column)
        batch = dict(self.processor(images=_column(rows, image_column)))
        batch.update(self.processor.encode_text(texts, truncation=True, max_length=self.max_length))
        if idx_column:
            batch["idx"] = torch.as_tensor(_column(rows, idx_column), dtype=torch.long)
        batch["return_loss"] = True  # the training step's losses (the forward gives ITC logits otherwise)
        return batch


class MPLUGImageTextClassificationCollator:
    """Batches rows for [`MPLUGForVisualEntailment`] (`image`, `hypothesis`, `label`) and, with `pair_columns`,
    [`MPLUGForVisualReasoning`] (two images per row, `(B, 2, C, H, W)`): `[CLS] text` ids and class ids (label names
    are mapped through `label2id`)."""

    def __init__(
        self,
        processor: MPLUGProcessor,
        label2id: dict[str, int],
        image_column: str = "image",
        text_column: str = "hypothesis",
        label_column: str = "label",
        pair_columns: tuple[str, str] | None = None,
        max_length: int = 40,
    ):
        if not label2id:
            raise ValueError("`label2id` must map at least one label name to its id.")
        self.processor, self.label2id = processor, dict(label2id)
        self.columns = (image_column, text_column, label_column)
        self.pair_columns = pair_columns
        self.max_length = max_length

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        image_column, text_column, label_column = self.columns
        texts = _texts(rows, text_column)
        labels = []
        for index, label in enumerate(_column(rows, label_column)):
            if isinstance(label, str):
                if label not in self.label2id:
                    raise ValueError(f"Example {index}: label {label!r} is not one of {sorted(self.label2id)}.")
                label = self.label2id[label]
            if not 0 <= int(label) < len(self.label2id):
                raise ValueError(f"Example {index}: label {label!r} is not a class id in [0, {len(self.label2id)}).")
            labels.append(int(label))
        if self.pair_columns is not None:
            left, right = self.pair_columns
            batch = dict(self.processor.encode_image_pairs(list(zip(_column(rows, left), _column(rows, right)))))
        else:
            batch = dict(self.processor(images=_column(rows, image_column)))
        batch.update(self.processor.encode_text(texts, truncation=True, max_length=self.max_length))
        batch["labels"] = torch.tensor(labels)
        return batch


class MPLUGGroundingCollator:
    """Batches grounding rows (`image`, `phrase`, pixel `box` `[x1, y1, x2, y2]`) for [`MPLUGForGrounding`]:
    letterboxed images, `[CLS] phrase [SEP]` ids and normalised `(cx, cy, w, h)` targets (`prepare_grounding`)."""

    def __init__(
        self,
        processor: MPLUGProcessor,
        image_column: str = "image",
        phrase_column: str = "phrase",
        box_column: str = "box",
        max_length: int | None = None,
    ):
        self.processor = processor
        self.columns = (image_column, phrase_column, box_column)
        self.max_length = max_length

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        image_column, phrase_column, box_column = self.columns
        phrases = _texts(rows, phrase_column)
        boxes = _column(rows, box_column)
        for index, box in enumerate(boxes):
            if box is None or len(box) != 4:
                raise ValueError(f"Example {index}: `{box_column}` must be [x1, y1, x2, y2], got {box!r}.")
        batch = self.processor.prepare_grounding(
            _column(rows, image_column), phrases, boxes=boxes, max_length=self.max_length
        )
        batch.pop("image_geometry")
        return dict(batch)


def mask_text_tokens(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    mask_token_id: int,
    vocab_size: int,
    special_token_ids: Sequence[int],
    probability: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking for MLM: each real, non-special token is picked with `probability` (at least one per row);
    picked tokens become `[MASK]` (80 %), a random token (10 %) or stay (10 %). Returns `(masked_ids, labels)` with
    the original ids at the picked positions and -100 elsewhere."""
    if not 0.0 < probability < 1.0:
        raise ValueError(f"`probability` must be in (0, 1), got {probability!r}.")
    candidates = attention_mask.bool().clone()
    for token in special_token_ids:
        candidates &= input_ids != token
    picked = (torch.rand(input_ids.shape, generator=generator) < probability) & candidates
    for row in range(input_ids.shape[0]):  # every row with a maskable token gets at least one
        if not picked[row].any() and candidates[row].any():
            options = candidates[row].nonzero().flatten()
            picked[row, options[torch.randint(len(options), (1,), generator=generator)]] = True
    labels = input_ids.masked_fill(~picked, -100)
    masked = input_ids.clone()
    draw = torch.rand(input_ids.shape, generator=generator)
    masked[picked & (draw < 0.8)] = mask_token_id
    replace = picked & (draw >= 0.8) & (draw < 0.9)
    masked[replace] = torch.randint(vocab_size, input_ids.shape, generator=generator)[replace]
    return masked, labels


class MPLUGPretrainingCollator:
    """Batches image-caption rows for [`MPLUGForPreTraining`]: the captions (ITC/ITM), a masked copy with MLM
    labels (`mlm_probability` of the tokens), and for PrefixLM a random split of each caption into a prefix given to
    the encoder (`prefix_input_ids`) and the continuation the decoder writes (`prefix_lm_labels`,
    `[CLS] rest [SEP]`). Rows with the same `idx_column` value (e.g. an image id) are ITC positives of each other."""

    def __init__(
        self,
        processor: MPLUGProcessor,
        image_column: str = "image",
        caption_column: str = "caption",
        idx_column: str | None = None,
        mlm_probability: float = 0.15,
        max_length: int = 30,
        generator: torch.Generator | None = None,
    ):
        vocab = processor.tokenizer.get_vocab()
        for token in ("[MASK]", "[CLS]", "[SEP]", "[PAD]"):
            if token not in vocab:
                raise ValueError(f"The tokenizer has no {token} token, which pretraining needs.")
        if not 0.0 < mlm_probability < 1.0:
            raise ValueError(f"`mlm_probability` must be in (0, 1), got {mlm_probability!r}.")
        self.processor = processor
        self.columns = (image_column, caption_column, idx_column)
        self.mlm_probability = mlm_probability
        self.max_length = max_length
        self.generator = generator
        self.mask_id, self.cls_id, self.sep_id, self.pad_id = (vocab[t] for t in ("[MASK]", "[CLS]", "[SEP]", "[PAD]"))
        self.vocab_size = len(vocab)

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        image_column, caption_column, idx_column = self.columns
        captions = _column(rows, caption_column)
        for index, caption in enumerate(captions):
            if not isinstance(caption, str) or not caption.strip():
                raise ValueError(f"Example {index}: `{caption_column}` is empty.")
        batch = dict(self.processor(images=_column(rows, image_column)))
        encoded = self.processor.encode_text(captions, truncation=True, max_length=self.max_length)
        batch.update(encoded)
        batch["mlm_input_ids"], batch["mlm_labels"] = mask_text_tokens(
            encoded["input_ids"],
            encoded["attention_mask"],
            self.mask_id,
            self.vocab_size,
            (self.cls_id, self.sep_id, self.pad_id),
            self.mlm_probability,
            self.generator,
        )
        prefixes, targets = [], []
        for ids, mask in zip(encoded["input_ids"].tolist(), encoded["attention_mask"].tolist()):
            words = ids[1 : sum(mask)]  # the caption without [CLS]
            split = int(torch.randint(1, len(words), (1,), generator=self.generator)) if len(words) > 1 else 0
            prefixes.append([self.cls_id] + words[:split])
            targets.append([self.cls_id] + words[split:] + [self.sep_id])
        batch["prefix_input_ids"], batch["prefix_attention_mask"] = self._pad(prefixes, self.pad_id)
        target_ids, target_mask = self._pad(targets, self.pad_id)
        batch["prefix_lm_labels"] = target_ids.masked_fill(target_mask == 0, -100)
        if idx_column is not None:
            batch["idx"] = torch.as_tensor(_column(rows, idx_column), dtype=torch.long)
        return batch

    @staticmethod
    def _pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, sequence in enumerate(sequences):
            ids[row, : len(sequence)] = torch.tensor(sequence)
            mask[row, : len(sequence)] = 1
        return ids, mask


__all__ = [
    "MPLUGVQACollator",
    "MPLUGCaptioningCollator",
    "MPLUGPretrainingCollator",
    "MPLUGRetrievalCollator",
    "MPLUGImageTextClassificationCollator",
    "MPLUGGroundingCollator",
    "mask_text_tokens",
    "ENTAILMENT_LABELS",
    "shapes_pair_examples",
    "shapes_entailment_examples",
    "load_shapes_entailment_dataset",
    "draw_scene",
    "load_shapes_dataset",
    "shapes_examples",
    "shapes_vocabulary",
]
