"""Evaluation metrics of the mPLUG tasks, pure Python (no network, no Java): VQA accuracy, BLEU-1..4, CIDEr-D,
retrieval Recall@K, grounding accuracy at IoU >= 0.5.

Example:
    >>> from transformers_mplug.metrics import vqa_accuracy, caption_metrics
    >>> vqa_accuracy(["two"], [["2"] * 10])
    1.0
    >>> round(caption_metrics(["a red circle"], [["a red circle"]])["BLEU-1"], 3)
    1.0
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

import torch


def _check_scoring_inputs(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    names: tuple[str, str] = ("predictions", "references"),
) -> None:
    """Predictions: a non-empty list of strings; references: one non-empty list of strings per prediction (a plain
    string there would be read as a list of characters)."""
    pred_name, ref_name = names
    for name, value in ((pred_name, predictions), (ref_name, references)):
        if isinstance(value, str) or not isinstance(value, Sequence):
            raise TypeError(f"`{name}` must be a list, got {type(value).__name__}.")
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} `{pred_name}` but {len(references)} `{ref_name}`; pass one per question.")
    if not predictions:
        raise ValueError(f"Nothing to score: `{pred_name}` is empty.")
    for index, prediction in enumerate(predictions):
        if not isinstance(prediction, str):
            raise TypeError(f"`{pred_name}[{index}]` must be a string, got {type(prediction).__name__}.")
    _check_reference_lists(references, ref_name)


def _check_reference_lists(references: Sequence[Sequence[str]], name: str) -> None:
    for index, group in enumerate(references):
        if isinstance(group, str):
            raise TypeError(
                f"`{name}[{index}]` is a string; each entry must be a list of strings (wrap it: [{group!r}])."
            )
        if not isinstance(group, Sequence) or not group:
            raise ValueError(f"`{name}[{index}]` must be a non-empty list of strings.")
        for item in group:
            if not isinstance(item, str):
                raise TypeError(f"`{name}[{index}]` must hold strings, got {type(item).__name__}.")


# ------------------------------------------------------------------------------------------------ VQA accuracy
_CONTRACTIONS = {
    "aint": "ain't",
    "arent": "aren't",
    "cant": "can't",
    "couldve": "could've",
    "couldnt": "couldn't",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "dont": "don't",
    "hadnt": "hadn't",
    "hasnt": "hasn't",
    "havent": "haven't",
    "hed": "he'd",
    "hes": "he's",
    "howd": "how'd",
    "howll": "how'll",
    "hows": "how's",
    "Id": "I'd",
    "Im": "I'm",
    "Ive": "I've",
    "isnt": "isn't",
    "itd": "it'd",
    "itll": "it'll",
    "let's": "let's",
    "maam": "ma'am",
    "mightnt": "mightn't",
    "mightve": "might've",
    "mustnt": "mustn't",
    "mustve": "must've",
    "neednt": "needn't",
    "notve": "not've",
    "oclock": "o'clock",
    "oughtnt": "oughtn't",
    "shant": "shan't",
    "shed": "she'd",
    "shes": "she's",
    "shouldve": "should've",
    "shouldnt": "shouldn't",
    "somebodyd": "somebody'd",
    "someoned": "someone'd",
    "someonell": "someone'll",
    "someones": "someone's",
    "somethingd": "something'd",
    "somethingll": "something'll",
    "thats": "that's",
    "thered": "there'd",
    "therere": "there're",
    "theres": "there's",
    "theyd": "they'd",
    "theyll": "they'll",
    "theyre": "they're",
    "theyve": "they've",
    "twas": "'twas",
    "wasnt": "wasn't",
    "wed": "we'd",
    "weve": "we've",
    "werent": "weren't",
    "whatll": "what'll",
    "whatre": "what're",
    "whats": "what's",
    "whatve": "what've",
    "whens": "when's",
    "whered": "where'd",
    "wheres": "where's",
    "whereve": "where've",
    "whod": "who'd",
    "wholl": "who'll",
    "whos": "who's",
    "whove": "who've",
    "whyll": "why'll",
    "whyre": "why're",
    "whys": "why's",
    "wont": "won't",
    "wouldve": "would've",
    "wouldnt": "wouldn't",
    "yall": "y'all",
    "youd": "you'd",
    "youll": "you'll",
    "youre": "you're",
    "youve": "you've",
}
_NUMBERS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = {"a", "an", "the"}
_PUNCTUATION = [
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
]
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def normalize_vqa_answer(answer: str) -> str:
    """The official VQA answer normalisation: punctuation, number words to digits, articles, contractions."""
    text = answer.replace("\n", " ").replace("\t", " ").strip().lower()
    for p in _PUNCTUATION:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            text = text.replace(p, "")
        else:
            text = text.replace(p, " ")
    text = _PERIOD_STRIP.sub("", text)
    words = []
    for word in text.split():
        word = _NUMBERS.get(word, word)
        if word not in _ARTICLES:
            words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def vqa_accuracy(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> float:
    """Official VQA accuracy: for each question, `min(1, #humans that gave the answer / 3)` averaged over the 10
    leave-one-annotator-out subsets, then averaged over questions."""
    _check_scoring_inputs(predictions, answers, ("predictions", "answers"))
    total = 0.0
    for prediction, human in zip(predictions, answers):
        if not human:
            raise ValueError("Every question needs at least one human answer.")
        guess = normalize_vqa_answer(prediction)
        human = [normalize_vqa_answer(a) for a in human]
        scores = []
        for i in range(len(human)):
            others = human[:i] + human[i + 1 :] if len(human) > 1 else human
            scores.append(min(1.0, sum(a == guess for a in others) / 3.0))
        total += sum(scores) / len(scores)
    return total / len(predictions)


# ------------------------------------------------------------------------------------------------ captions
_PTB_PUNCTUATION = {
    "''",
    "'",
    "``",
    "`",
    "-LRB-",
    "-RRB-",
    "-LCB-",
    "-RCB-",
    ".",
    "?",
    "!",
    ",",
    ":",
    "-",
    "--",
    "...",
    ";",
}


def ptb_tokenize(text: str) -> list[str]:
    """PTB-style tokenisation as the COCO caption evaluation applies it: lower-case, punctuation split off and
    removed, clitics separated."""
    text = text.lower().replace("\n", " ")
    text = re.sub(r"([.,!?;:()\[\]{}\"])", r" \1 ", text)
    text = re.sub(r"(\w)('s|'re|'ve|'ll|'d|'m|n't)\b", r"\1 \2", text)
    return [token for token in text.split() if token not in _PTB_PUNCTUATION and not re.fullmatch(r"[^\w']+", token)]


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def bleu(predictions: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4) -> list[float]:
    """Corpus BLEU-1..`max_n` as the COCO caption evaluation computes it (clipped counts over all references,
    closest reference length, brevity penalty over the corpus)."""
    _check_scoring_inputs(predictions, references)
    hyps = [ptb_tokenize(p) for p in predictions]
    refs = [[ptb_tokenize(r) for r in rs] for rs in references]
    correct, total = [0] * max_n, [0] * max_n
    hyp_len = ref_len = 0
    for hyp, rs in zip(hyps, refs):
        hyp_len += len(hyp)
        ref_len += min((abs(len(r) - len(hyp)), len(r)) for r in rs)[1]
        for n in range(1, max_n + 1):
            counts = _ngrams(hyp, n)
            max_ref = Counter()
            for r in rs:
                max_ref |= _ngrams(r, n)
            correct[n - 1] += sum(min(c, max_ref[g]) for g, c in counts.items())
            total[n - 1] += max(len(hyp) - n + 1, 0)
    tiny, small = 1e-15, 1e-9
    brevity = math.exp(1 - ref_len / (hyp_len + tiny)) if hyp_len < ref_len else 1.0
    scores, product = [], 1.0
    for n in range(max_n):
        product *= (correct[n] + tiny) / (total[n] + small)
        scores.append(brevity * product ** (1.0 / (n + 1)))
    return scores


class CiderD:
    """CIDEr-D (COCO caption evaluation) with document frequencies taken from a reference corpus: tf-idf n-gram
    vectors (n = 1..4), clipped similarity, Gaussian length penalty (sigma 6), averaged over references, times 10.
    Build it once on the training references to score sampled captions as the SCST reward.

    Example:
        >>> scorer = CiderD([["a red circle"], ["a blue square"], ["a green triangle"]])
        >>> [round(s, 2) for s in scorer.scores(["a red circle", "a blue circle"], [["a red circle"], ["a blue square"]])]
        [7.5, 2.5]
    """

    def __init__(self, corpus_references: Sequence[Sequence[str]], sigma: float = 6.0) -> None:
        if isinstance(corpus_references, str) or not corpus_references:
            raise ValueError("`corpus_references` must hold at least one list of reference captions.")
        _check_reference_lists(corpus_references, "corpus_references")
        self.sigma = sigma
        self.document_frequency: Counter = Counter()
        for rs in corpus_references:
            tokens = [ptb_tokenize(r) for r in rs]
            self.document_frequency.update({g for r in tokens for n in range(1, 5) for g in _ngrams(r, n)})
        self.log_images = math.log(float(len(corpus_references)))

    def _vector(self, tokens: list[str]):
        vec, norms = [{} for _ in range(4)], [0.0] * 4
        for n in range(1, 5):
            for gram, tf in _ngrams(tokens, n).items():
                weight = float(tf) * (self.log_images - math.log(max(1.0, self.document_frequency[gram])))
                vec[n - 1][gram] = weight
                norms[n - 1] += weight * weight
        return vec, [math.sqrt(x) for x in norms], len(tokens)

    def scores(self, predictions: Sequence[str], references: Sequence[Sequence[str]]) -> list[float]:
        """The CIDEr-D of each prediction against its own references."""
        _check_scoring_inputs(predictions, references)
        result = []
        for prediction, rs in zip(predictions, references):
            if not rs:
                raise ValueError("Every prediction needs at least one reference caption.")
            hyp_vec, hyp_norm, hyp_len = self._vector(ptb_tokenize(prediction))
            total = [0.0] * 4
            for r in rs:
                ref_vec, ref_norm, ref_len = self._vector(ptb_tokenize(r))
                delta = float(hyp_len - ref_len)
                for n in range(4):
                    value = sum(min(w, ref_vec[n].get(g, 0.0)) * ref_vec[n].get(g, 0.0) for g, w in hyp_vec[n].items())
                    if hyp_norm[n] != 0 and ref_norm[n] != 0:
                        value /= hyp_norm[n] * ref_norm[n]
                    total[n] += value * math.exp(-(delta**2) / (2 * self.sigma**2))
            result.append(sum(total) / 4 / len(rs) * 10.0)
        return result


def cider_d(predictions: Sequence[str], references: Sequence[Sequence[str]], sigma: float = 6.0) -> float:
    """Corpus CIDEr-D (COCO caption evaluation), document frequencies from `references` (see [`CiderD`])."""
    scores = CiderD(references, sigma).scores(predictions, references)
    return sum(scores) / len(scores)


def caption_metrics(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """BLEU-1..4 and CIDEr-D of captions against their reference lists."""
    _check_scoring_inputs(predictions, references)
    scores = {f"BLEU-{n + 1}": value for n, value in enumerate(bleu(predictions, references))}
    scores["CIDEr-D"] = cider_d(predictions, references)
    return scores


# ------------------------------------------------------------------------------------------------ retrieval / grounding
def retrieval_recall(
    scores_i2t: torch.Tensor,
    scores_t2i: torch.Tensor,
    text_to_image: Sequence[int],
    image_to_texts: Sequence[Sequence[int]],
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Recall@K in percent both ways, as the original `itm_eval`: a query counts when its best-ranked ground truth
    is within the top K. `scores_i2t` is (images, texts), `scores_t2i` (texts, images)."""
    scores_i2t, scores_t2i = torch.as_tensor(scores_i2t), torch.as_tensor(scores_t2i)
    if scores_i2t.dim() != 2 or scores_t2i.dim() != 2 or scores_i2t.shape != scores_t2i.shape[::-1]:
        raise ValueError(
            f"`scores_i2t` must be (images, texts) and `scores_t2i` (texts, images), got {tuple(scores_i2t.shape)} and "
            f"{tuple(scores_t2i.shape)}."
        )
    num_images, num_texts = scores_i2t.shape
    if num_images == 0 or num_texts == 0:
        raise ValueError("Nothing to score: the score matrices are empty.")
    if len(image_to_texts) != num_images or len(text_to_image) != num_texts:
        raise ValueError(
            f"`image_to_texts` has {len(image_to_texts)} entries for {num_images} images and `text_to_image` "
            f"{len(text_to_image)} for {num_texts} texts; pass one per image / text."
        )
    for index, truths in enumerate(image_to_texts):
        if isinstance(truths, int) or not truths or not all(0 <= int(t) < num_texts for t in truths):
            raise ValueError(f"`image_to_texts[{index}]` must be a non-empty list of text indices in [0, {num_texts}).")
    for index, image in enumerate(text_to_image):
        if not 0 <= int(image) < num_images:
            raise ValueError(f"`text_to_image[{index}]` = {image} is not an image index in [0, {num_images}).")
    if not ks or any(not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"`ks` must be positive ints, got {ks!r}.")
    ranks_i2t = []
    for i, truths in enumerate(image_to_texts):
        order = scores_i2t[i].argsort(descending=True).tolist()
        ranks_i2t.append(min(order.index(t) for t in truths))
    ranks_t2i = []
    for t, image in enumerate(text_to_image):
        ranks_t2i.append(scores_t2i[t].argsort(descending=True).tolist().index(image))
    result = {}
    for k in ks:
        result[f"txt_r{k}"] = 100.0 * sum(r < k for r in ranks_i2t) / len(ranks_i2t)
        result[f"img_r{k}"] = 100.0 * sum(r < k for r in ranks_t2i) / len(ranks_t2i)
    result["txt_r_mean"] = sum(result[f"txt_r{k}"] for k in ks) / len(ks)
    result["img_r_mean"] = sum(result[f"img_r{k}"] for k in ks) / len(ks)
    result["r_mean"] = (result["txt_r_mean"] + result["img_r_mean"]) / 2
    return result


def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """IoU of matching rows of two `(N, 4)` xyxy box sets."""
    boxes1, boxes2 = torch.as_tensor(boxes1, dtype=torch.float32), torch.as_tensor(boxes2, dtype=torch.float32)
    area1 = (boxes1[:, 2] - boxes1[:, 0]).clamp(min=0) * (boxes1[:, 3] - boxes1[:, 1]).clamp(min=0)
    area2 = (boxes2[:, 2] - boxes2[:, 0]).clamp(min=0) * (boxes2[:, 3] - boxes2[:, 1]).clamp(min=0)
    wh = (torch.min(boxes1[:, 2:], boxes2[:, 2:]) - torch.max(boxes1[:, :2], boxes2[:, :2])).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    return inter / (area1 + area2 - inter + 1e-16)


def grounding_accuracy(predicted_boxes: torch.Tensor, target_boxes: torch.Tensor, threshold: float = 0.5) -> float:
    """Fraction of predicted xyxy boxes with IoU >= `threshold` against their targets (Acc@0.5)."""
    iou = box_iou(predicted_boxes, target_boxes)
    if iou.numel() == 0:
        raise ValueError("No boxes to score.")
    return float((iou >= threshold).float().mean())


__all__ = [
    "normalize_vqa_answer",
    "vqa_accuracy",
    "ptb_tokenize",
    "bleu",
    "cider_d",
    "CiderD",
    "caption_metrics",
    "retrieval_recall",
    "box_iou",
    "grounding_accuracy",
]
