#!/usr/bin/env python
"""Score generated images with an mPLUG VQA model, as text-to-image faithfulness benchmarks (TIFA, DPG-Bench) do.

    python examples/score_text_to_image.py --model_name_or_path mplug-vqa-large --questions questions.json \\
        --output_dir scores

`questions.json` is a list of `{"image": path, "question": str, "choices": [str, ...] (optional), "answer": str
(optional)}`; image paths are relative to the file (or `--image_root`). Questions with `choices` are answered by
ranking the choices (`rank_answers`: the probability of each choice given the image and the question); free-form
questions by the folder's decoding (`generate`), scored by exact match. Each image is encoded once for all its
questions, and questions are batched. `scores.json` holds every question's answer, score and correctness, the mean
correctness per image, and their mean (the benchmark score).

`--demo_questions N` writes N scenes of the package's embedded data with questions (half with choices) to
`output_dir/demo` and scores those.
"""

from __future__ import annotations

import argparse
import json
import re
import string
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from transformers_mplug import MPLUGForQuestionAnswering, MPLUGProcessor

_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize_answer(text: str) -> str:
    """Lower-case, punctuation removed, whitespace collapsed (the exact-match comparison)."""
    return " ".join(_PUNCTUATION.sub(" ", text.lower()).split())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", required=True, help="an mPLUG VQA folder (e.g. a converted one)")
    parser.add_argument("--questions", help="JSON list of {image, question, choices?, answer?}")
    parser.add_argument("--image_root", help="folder the image paths are relative to (default: the JSON's folder)")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--batch_size", type=int, default=16, help="questions per forward pass")
    parser.add_argument("--demo_questions", type=int, help="score N scenes of the embedded data instead")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = parser.parse_args(argv)
    if (args.questions is None) == (args.demo_questions is None):
        parser.error("pass exactly one of --questions and --demo_questions")
    if args.batch_size < 1:
        parser.error("--batch_size must be >= 1")
    return args


def read_questions(path: Path, image_root: Path | None = None) -> list[dict[str, Any]]:
    """The questions of a benchmark file, checked; `image` becomes a resolved path."""
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"`--questions` {path} cannot be read as JSON: {error}") from None
    if not isinstance(items, list) or not items:
        raise ValueError(f"`--questions` {path} must hold a non-empty JSON list of questions.")
    root = image_root if image_root is not None else path.parent
    questions = []
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise ValueError(f"question {index} is not an object with `image` and `question`.")
        unknown = sorted(set(item) - {"image", "question", "choices", "answer", "id"})
        if unknown:
            raise ValueError(f"question {index} has unknown field(s) {unknown}; use image, question, choices, answer.")
        for field in ("image", "question"):
            if not isinstance(item.get(field), str) or not item[field].strip():
                raise ValueError(f"question {index} needs a non-empty string `{field}`.")
        choices = item.get("choices")
        if choices is not None and (
            not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c.strip() for c in choices)
        ):
            raise ValueError(f"question {index}: `choices` must be a non-empty list of non-empty strings.")
        answer = item.get("answer")
        if answer is not None and not isinstance(answer, str):
            raise ValueError(f"question {index}: `answer` must be a string.")
        image = Path(item["image"]) if Path(item["image"]).is_absolute() else root / item["image"]
        if not image.is_file():
            raise ValueError(f"question {index}: image {image} does not exist.")
        questions.append({**item, "image": str(image), "index": index})
    return questions


def write_demo_questions(folder: Path, num_scenes: int) -> Path:
    """Scenes of the embedded data as PNG files and a questions file: every other question with choices."""
    from transformers_mplug.data import shapes_examples, shapes_vocabulary

    folder.mkdir(parents=True, exist_ok=True)
    rows = shapes_examples(num_scenes, seed=7, questions_per_scene=3)
    words = [w for w in shapes_vocabulary() if w.isalpha()]
    items, images = [], {}
    for number, row in enumerate(rows):
        key = id(row["image"])
        if key not in images:
            images[key] = f"scene_{len(images)}.png"
            row["image"].save(folder / images[key])
        item = {"image": images[key], "question": row["question"], "answer": row["answers"][0]}
        if number % 2 == 0:
            distractors = [w for w in words if w != row["answers"][0]][: 3 + number % 3]
            item["choices"] = sorted({row["answers"][0], *distractors})
        items.append(item)
    path = folder / "questions.json"
    path.write_text(json.dumps(items, indent=1), encoding="utf-8")
    return path


@torch.no_grad()
def score_questions(
    model: MPLUGForQuestionAnswering,
    processor: MPLUGProcessor,
    questions: list[dict[str, Any]],
    batch_size: int = 16,
) -> list[dict[str, Any]]:
    """Answer every question; each image is encoded once. Returns one result per question, in order."""
    images = sorted({q["image"] for q in questions})
    image_embeds = {}
    for start in range(0, len(images), batch_size):
        paths = images[start : start + batch_size]
        pixels = processor(images=[Image.open(p).convert("RGB") for p in paths])["pixel_values"]
        embeds = model.mplug.encode_image(pixels.to(model.device, model.dtype))[1]
        image_embeds.update(zip(paths, embeds))
    results: dict[int, dict[str, Any]] = {}

    def batches(group: list[dict[str, Any]]):
        for start in range(0, len(group), batch_size):
            chunk = group[start : start + batch_size]
            text = processor(text=[q["question"] for q in chunk])
            yield chunk, torch.stack([image_embeds[q["image"]] for q in chunk]), text

    by_choices: dict[tuple[str, ...], list[dict[str, Any]]] = defaultdict(list)
    free_form = []
    for question in questions:
        if question.get("choices"):
            by_choices[tuple(question["choices"])].append(question)
        else:
            free_form.append(question)
    for choices, group in by_choices.items():  # questions sharing their choices are ranked in one call
        candidates = processor.encode_text(list(choices), add_eos=True)
        for chunk, embeds, text in batches(group):
            ranked = model.rank_answers(
                candidates["input_ids"].to(model.device),
                candidates["attention_mask"].to(model.device),
                image_embeds=embeds,
                input_ids=text["input_ids"].to(model.device),
                attention_mask=text["attention_mask"].to(model.device),
                k=len(choices),
            )
            for row, question in enumerate(chunk):
                best = int(ranked.indices[row, 0])
                order = ranked.indices[row].tolist()
                probabilities = dict(zip((choices[i] for i in order), ranked.probabilities[row].tolist()))
                results[question["index"]] = {
                    "answer": choices[best],
                    "score": float(ranked.probabilities[row, 0]),
                    "choice_probabilities": probabilities,
                }
    for chunk, embeds, text in batches(free_form):
        output = model.generate(
            image_embeds=embeds,
            input_ids=text["input_ids"].to(model.device),
            attention_mask=text["attention_mask"].to(model.device),
            return_dict_in_generate=True,
            output_scores=True,
        )
        answers = processor.batch_decode(output.sequences)
        scores = output.sequences_scores.tolist() if output.sequences_scores is not None else [None] * len(chunk)
        for question, answer, score in zip(chunk, answers, scores):
            results[question["index"]] = {"answer": answer, "score": score}
    scored = []
    for question in questions:
        result = results[question["index"]]
        expected = question.get("answer")
        correct = None if expected is None else normalize_answer(result["answer"]) == normalize_answer(expected)
        scored.append(
            {
                **{k: question[k] for k in ("image", "question", "choices", "answer", "id") if k in question},
                "predicted": result["answer"],
                "score": result["score"],
                "correct": correct,
                **(
                    {"choice_probabilities": result["choice_probabilities"]} if "choice_probabilities" in result else {}
                ),
            }
        )
    return scored


def per_image_means(scored: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean correctness of each image's questions that have an answer (the TIFA score of that image)."""
    groups: dict[str, list[bool]] = defaultdict(list)
    counts: dict[str, int] = defaultdict(int)
    for item in scored:
        counts[item["image"]] += 1
        if item["correct"] is not None:
            groups[item["image"]].append(item["correct"])
    return [
        {
            "image": image,
            "num_questions": counts[image],
            "num_with_answer": len(groups[image]),
            "mean_correct": sum(groups[image]) / len(groups[image]) if groups[image] else None,
        }
        for image in sorted(counts)
    ]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    try:
        model = MPLUGForQuestionAnswering.from_pretrained(
            args.model_name_or_path, dtype=torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
        ).eval()
        processor = MPLUGProcessor.from_pretrained(args.model_name_or_path)
        if args.demo_questions is not None:
            questions_file = write_demo_questions(output_dir / "demo", args.demo_questions)
        else:
            questions_file = Path(args.questions)
        questions = read_questions(questions_file, Path(args.image_root) if args.image_root else None)
    except (ValueError, TypeError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    scored = score_questions(model, processor, questions, args.batch_size)
    images = per_image_means(scored)
    means = [image["mean_correct"] for image in images if image["mean_correct"] is not None]
    summary = {
        "model": args.model_name_or_path,
        "num_questions": len(scored),
        "num_images": len(images),
        "mean_over_images": sum(means) / len(means) if means else None,
        "images": images,
        "questions": scored,
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "scores.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    print(
        f"{len(scored)} questions on {len(images)} images; mean correctness over images: "
        f"{summary['mean_over_images'] if means else 'n/a (no answers given)'}; written to {output_dir / 'scores.json'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
