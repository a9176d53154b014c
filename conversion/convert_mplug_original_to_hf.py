#!/usr/bin/env python
"""Convert an original AliceMind mPLUG checkpoint, or a ModelScope mPLUG model folder, into a Hugging Face folder
(config, safetensors weights, processor, generation config, model card), optionally verified against the original
weights and pushed to the Hub.

    python conversion/convert_mplug_original_to_hf.py \\
        --checkpoint_path mplug_base_vqa.pth --task vqa \\
        --config_path configs/vqa_mplug_base.yaml --bert_config_path configs/config_bert_stride3.json \\
        --vocab_path bert-base-uncased/vocab.txt --output_dir mplug-base-vqa --verify

    # a ModelScope folder (damo/mplug_visual-question-answering_coco_large_en, ...): task, configs, vocabulary and
    # weights are read from the folder
    python conversion/convert_mplug_original_to_hf.py --checkpoint_path mplug_vqa_large/ --output_dir OUT --verify

See conversion/README.md for every released file.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

import transformers_mplug
from transformers_mplug import (
    MPLUGForCaptioning,
    MPLUGForGrounding,
    MPLUGForPreTraining,
    MPLUGForQuestionAnswering,
    MPLUGForRetrieval,
    MPLUGProcessor,
)
from transformers_mplug.original_checkpoint import (
    MODELSCOPE_TASKS,
    MODELSCOPE_TEXT_KWARGS,
    config_from_original,
    detect_original_tasks,
    is_modelscope_folder,
    load_original_checkpoint,
    load_original_state_dict,
    read_modelscope_folder,
)

TASKS = {
    "vqa": MPLUGForQuestionAnswering,
    "caption": MPLUGForCaptioning,
    "retrieval": MPLUGForRetrieval,
    "grounding": MPLUGForGrounding,
    "pretrained": MPLUGForPreTraining,
}
# image resolution of the released task models (used when no yaml is given)
DEFAULT_TASK_RESOLUTION = {768: 384, 1024: 336}
FP32_TOLERANCE = dict(atol=1e-5, rtol=1e-4)
BF16_TOLERANCE = dict(atol=0.1, rtol=0.05)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--checkpoint_path",
        required=True,
        help="original .pth / DeepSpeed mp_rank_00_model_states.pt, or a ModelScope model folder",
    )
    parser.add_argument(
        "--task", choices=sorted(TASKS), help="required for AliceMind files; ModelScope folders name it"
    )
    parser.add_argument("--config_path", help="the task yaml of the original repository (image_res, generation, ...)")
    parser.add_argument("--bert_config_path", help="the config_bert*.json the yaml names (default: read from shapes)")
    parser.add_argument("--vocab_path", help="bert-base-uncased vocab.txt (ModelScope folders hold theirs)")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--image_size", type=int, help="target resolution (positional embeddings are resized)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="dtype of saved weights")
    parser.add_argument("--verify", action="store_true", help="reload the folder and compare with the original")
    parser.add_argument("--reference_dir", help="with --verify: compare with recorded inputs.pt / outputs.pt")
    parser.add_argument("--push_to_hub", metavar="REPO_ID", help="upload the folder with huggingface_hub")
    parser.add_argument("--dry_run_push", action="store_true", help="with --push_to_hub: list what would be uploaded")
    parser.add_argument(
        "--no_remote_code",
        action="store_true",
        help="do not copy the model code into the folder (it then needs `import transformers_mplug`)",
    )
    return parser.parse_args(argv)


def sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_task_config(path: str | None) -> dict[str, Any]:
    if path is None:
        return {}
    if not os.path.isfile(path):
        raise FileNotFoundError(f"`--config_path` {path} does not exist.")
    with open(path, encoding="utf-8") as handle:
        task_config = yaml.safe_load(handle)
    if not isinstance(task_config, dict):
        raise ValueError(f"`config_path` {path} is not a yaml mapping.")
    return task_config


def read_bert_config(path: str | None) -> dict[str, Any] | None:
    if path is None:
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def is_video_task(task_config: dict[str, Any]) -> bool:
    """The video task yamls (VATEX captioning, MSRVTT QA/retrieval) set frame counts and video roots."""
    return any(key.startswith("num_frm") or "video" in key for key in task_config)


def generation_config_for(model, task: str, task_config: dict[str, Any], processor: MPLUGProcessor | None = None):
    """The original task decoding: the original beam search (`decoding_mode="original"`) with the yaml's
    `beam_size`, `min_length` and `max_length`; for video captioning also the prompt the original generator starts
    from (`tokenizer(prompt).input_ids[:, :-1]`, which drops the prompt's last token: `[CLS] a picture`)."""
    if task not in ("vqa", "caption"):
        return None
    config = model.default_generation_config(model.config)
    if "beam_size" in task_config:
        config.num_beams = int(task_config["beam_size"])
    if "min_length" in task_config:
        config.min_new_tokens = int(task_config["min_length"])
    if "max_length" in task_config:
        config.max_new_tokens = int(task_config["max_length"])
    if task == "caption" and is_video_task(task_config) and task_config.get("prompt"):
        if processor is None:
            raise ValueError("The video-captioning prompt needs the processor (vocabulary) to be tokenised.")
        ids = processor.encode_text(task_config["prompt"], return_tensors=None)["input_ids"][0]
        config.decoder_prompt_ids = ids[:-1]
    return config


def build(
    args: argparse.Namespace,
    state_dict: dict[str, torch.Tensor],
    task_config: dict[str, Any],
    bert_config: dict[str, Any] | None = None,
    modelscope: bool = False,
):
    """Our model (fp32) with the original weights loaded strictly, and the mapping report."""
    if bert_config is None:
        bert_config = read_bert_config(args.bert_config_path)
    image_size = args.image_size
    if image_size is None and "image_res" not in task_config and args.task != "pretrained":
        width = state_dict["visual_encoder.visual.conv1.weight"].shape[0]
        image_size = DEFAULT_TASK_RESOLUTION.get(int(width))
    config = config_from_original(bert_config, state_dict, image_size=image_size, task_config=task_config)
    if modelscope:  # ModelScope's CLIP has no attention dropout (AliceMind's has 0.1); only training sees it
        config.vision_config.attention_dropout = 0.0
    model_class = TASKS[args.task]
    # built on the meta device, the model takes the (memory-mapped) checkpoint tensors it needs without a copy:
    # the weights it drops (momentum copies, ...) are never read
    with torch.device("meta"):
        model = model_class._from_config(config, attn_implementation="eager").eval()
    mapping = load_original_state_dict(model, state_dict, args.task, assign=True)
    return model, mapping


# ------------------------------------------------------------------------------------------------ verification
def _probe_inputs(config) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    size = config.vision_config.image_size
    vocab = config.vocab_size
    low = min(1000, vocab // 2)
    ids = torch.randint(low, vocab, (2, 6), generator=generator)
    ids[:, 0] = config.bos_token_id
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    ids[1, 4:] = config.pad_token_id
    answers = torch.randint(low, vocab, (2, 4), generator=generator)
    answers[:, 0], answers[:, -1] = config.bos_token_id, config.eos_token_id
    return {
        "pixel_values": torch.randn(2, 3, size, size, generator=generator),
        "input_ids": ids,
        "attention_mask": mask,
        "answers": answers,
    }


@torch.no_grad()
def probe_outputs(model, task: str, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Outputs compared by --verify (floating tensors by tolerance, integer tensors exactly)."""
    pixels, ids, mask = inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"]
    valid = mask[..., None].float()
    if task == "caption":
        out = model(pixel_values=pixels, labels=inputs["answers"])
        greedy = model.generate(pixel_values=pixels, num_beams=1, min_new_tokens=1, max_new_tokens=5)
        beam = model.generate(pixel_values=pixels, return_dict_in_generate=True, output_scores=True)
        return {
            "image_embeds": out.memory,
            "logits": out.logits,
            "loss": out.loss,
            "greedy_ids": greedy,
            "default_decoding_ids": beam.sequences,
            "default_decoding_scores": beam.sequences_scores,
        }
    trunk = model.mplug(pixel_values=pixels, input_ids=ids, attention_mask=mask)
    result = {
        "image_embeds": trunk.image_embeds,
        "text_embeds": trunk.text_embeds * valid,
        "fused_image_embeds": trunk.fused_image_embeds,
        "fused_text_embeds": trunk.fused_text_embeds * valid,
    }
    if task == "vqa":
        out = model(pixel_values=pixels, input_ids=ids, attention_mask=mask, labels=inputs["answers"])
        result.update(
            logits=out.logits,
            loss=out.loss,
            greedy_ids=model.generate(
                pixel_values=pixels, input_ids=ids, attention_mask=mask, num_beams=1, min_new_tokens=1, max_new_tokens=5
            ),
        )
        beam = model.generate(
            pixel_values=pixels, input_ids=ids, attention_mask=mask, return_dict_in_generate=True, output_scores=True
        )
        result.update(default_decoding_ids=beam.sequences, default_decoding_scores=beam.sequences_scores)
    elif task in ("retrieval", "pretrained"):
        result.update(
            image_features=model.get_image_features(pixel_values=pixels).pooler_output,
            text_features=model.get_text_features(ids, mask).pooler_output,
            itm_logits=model.match_pairs(pixels, ids, mask),
        )
    if task == "pretrained":
        answers = inputs["answers"]
        decoded = model.text_decoder(
            input_ids=answers,
            encoder_hidden_states=trunk.last_hidden_state,
            encoder_attention_mask=trunk.memory_attention_mask,
            use_cache=False,
        )
        result.update(mlm_logits=model.mlm_head(trunk.fused_text_embeds) * valid, decoder_logits=decoded.logits)
    elif task == "grounding":
        prediction = model.predict_boxes(pixels, ids, mask)
        start = model.config.coordinate_token_start_id
        result.update(
            coordinate_logits=prediction.logits[..., start : start + model.config.num_coordinate_bins],
            pred_tokens=prediction.pred_tokens,
        )
    return result


def _as_recorded_ids(output) -> torch.Tensor:
    """`generate` output as the fixtures record beam ids: `(batch, 1, length)`, -1 after each sequence."""
    ids = output.sequences.clone()
    positions = torch.arange(ids.shape[1], device=ids.device)
    ids[positions[None, :] >= output.sequence_lengths[:, None]] = -1
    return ids[:, None, :]


def reference_checks(model, task: str, reference_dir: Path) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, ours, recorded) for the recorded outputs of the original code in a fixture folder."""
    inputs = torch.load(reference_dir / "inputs.pt", weights_only=True)
    ref = torch.load(reference_dir / "outputs.pt", weights_only=True)
    checks = []
    with torch.no_grad():
        if task in ("vqa", "grounding", "retrieval"):
            pixels = inputs.get("image", inputs.get("video", inputs.get("eval_image")))
            if task == "grounding":
                ids, mask = inputs["word_id"], inputs["word_mask"]
            elif task == "retrieval":
                ids, mask = inputs["train_input_ids"], inputs["train_attention_mask"]
                pixels = inputs["train_image"]
            else:
                ids, mask = inputs["question_input_ids"], inputs["question_attention_mask"]
            trunk = model.mplug(pixel_values=pixels, input_ids=ids, attention_mask=mask)
            encoders = ref.get("encoders", ref.get("train", {}))
            for name, ours in (
                ("fusion_image_output", trunk.fused_image_embeds),
                ("fusion_text_output", trunk.fused_text_embeds),
                ("text_embeds", trunk.text_embeds),
                ("image_embeds", trunk.image_embeds),
            ):
                if name in encoders and encoders[name].shape == ours.shape:
                    checks.append((f"encoders.{name}", ours, encoders[name]))
        if task == "vqa" and "rank_answer" in ref:
            ranked = model.rank_answers(
                inputs["answer_list_input_ids"],
                inputs["answer_list_attention_mask"],
                pixel_values=pixels,
                input_ids=ids,
                attention_mask=mask,
                k=inputs["rank_k"],
            )
            checks += [
                ("rank_answer.topk_ids", ranked.indices, ref["rank_answer"]["topk_ids"]),
                ("rank_answer.topk_probs", ranked.probabilities, ref["rank_answer"]["topk_probs"]),
            ]
        if task == "vqa" and "teacher_forced" in ref:
            labels = inputs["answer_input_ids"].masked_fill(inputs["answer_attention_mask"] == 0, -100)
            out = model(
                pixel_values=pixels,
                input_ids=ids,
                attention_mask=mask,
                labels=labels,
                answers_per_question=inputs["k"],
                answer_weights=inputs["weights"],
            )
            checks += [
                ("teacher_forced.logits", out.logits, ref["teacher_forced"]["logits"]),
                ("train.loss", out.loss, ref["train"]["loss"]),
            ]
        if task == "caption":
            pixels = inputs.get("image", inputs.get("video"))
            if "caption_input_ids" in inputs and "train" in ref:
                ids, mask = inputs["caption_input_ids"], inputs["caption_attention_mask"]
                out = model(
                    pixel_values=pixels, input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)
                )
                checks += [
                    ("teacher_forced.logits", out.logits, ref["teacher_forced"]["logits"]),
                    ("train.loss", out.loss, ref["train"]["loss"]),
                ]
            elif "teacher_forced_input_ids" in inputs:
                ids, mask = inputs["teacher_forced_input_ids"], inputs["teacher_forced_attention_mask"]
                labels = ids.masked_fill(mask == 0, -100)
                labels[:, : ref["prompt_length"]] = -100
                out = model(pixel_values=pixels, input_ids=ids, attention_mask=mask, labels=labels)
                checks += [
                    ("teacher_forced.logits", out.logits, ref["teacher_forced"]["logits"]),
                    ("teacher_forced.loss", out.loss, ref["teacher_forced"]["loss"]),
                ]
        if task in ("vqa", "caption") and "generate_beam" in ref:
            # the folder's default decoding against the original's beam search
            if task == "vqa":
                decode_inputs = dict(pixel_values=pixels, input_ids=ids, attention_mask=mask)
            else:
                decode_inputs = dict(pixel_values=pixels)
            beam = model.generate(**decode_inputs, return_dict_in_generate=True, output_scores=True)
            checks += [
                ("generate_beam.ids", _as_recorded_ids(beam), ref["generate_beam"]["ids"]),
                ("generate_beam.scores", beam.sequences_scores.view(-1, 1), ref["generate_beam"]["scores"]),
            ]
        if task == "retrieval" and "evaluation" in ref:
            result = model.retrieve(
                pixel_values=inputs["eval_image"],
                input_ids=inputs["eval_text_input_ids"],
                attention_mask=inputs["eval_text_attention_mask"],
                k=inputs["k_test"],
            )
            checks += [
                ("evaluation.itc_sims_i2t", result.similarity, ref["evaluation"]["itc_sims_i2t"]),
                ("evaluation.ranking_i2t", result.image_to_text_indices, ref["evaluation"]["ranking_i2t"]),
                ("evaluation.ranking_t2i", result.text_to_image_indices, ref["evaluation"]["ranking_t2i"]),
            ]
        if task == "grounding":
            prediction = model.predict_boxes(pixels, ids, mask)
            checks += [
                ("eval.pred_tokens", prediction.pred_tokens, ref["eval"]["pred_tokens"]),
                ("eval.pred_box", prediction.pred_boxes, ref["eval"]["pred_box"]),
            ]
    return checks


def compare(rows: list[tuple[str, torch.Tensor, torch.Tensor]], tolerance: dict[str, float]) -> tuple[list, bool]:
    table, ok = [], True
    for name, ours, expected in rows:
        ours, expected = ours.detach().cpu(), expected.detach().cpu()
        if ours.shape != expected.shape:
            table.append((name, "shape", f"{tuple(ours.shape)} vs {tuple(expected.shape)}", False))
            ok = False
            continue
        if ours.is_floating_point() or expected.is_floating_point():
            error = (ours.float() - expected.float()).abs().max().item() if ours.numel() else 0.0
            passed = torch.allclose(ours.float(), expected.float(), **tolerance)
            table.append((name, "max |diff|", f"{error:.3e}", passed))
        else:
            passed = torch.equal(ours, expected)
            table.append((name, "exact", "equal" if passed else "DIFFERENT", passed))
        ok &= passed
    return table, ok


def format_table(table: list) -> str:
    lines = ["| output | check | value | ok |", "|---|---|---|---|"]
    lines += [f"| {name} | {check} | {value} | {'yes' if passed else 'NO'} |" for name, check, value, passed in table]
    return "\n".join(lines)


def verify(args, folder: Path, reference_model, task_config, generation_config=None) -> tuple[str, bool]:
    model_class = TASKS[args.task]
    if generation_config is not None:
        # the same decoding on both sides: the folder's (default generate) against the original tensors
        reference_model.generation_config = copy.deepcopy(generation_config)
    loaded, info = model_class.from_pretrained(
        folder, output_loading_info=True, attn_implementation="eager", dtype=torch.float32
    )
    if info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]:
        return f"reloading the folder was not strict: {info}", False
    loaded.eval()
    tolerance = BF16_TOLERANCE if args.dtype == "bfloat16" else FP32_TOLERANCE
    processor = MPLUGProcessor.from_pretrained(folder)
    if processor.image_processor.size["height"] != loaded.config.vision_config.image_size:
        return "the saved processor's resolution differs from the model's", False
    if args.reference_dir:
        if args.task == "pretrained":
            # recorded outputs exist for the task models: check the trunk and the decoder through the VQA head
            loaded = MPLUGForQuestionAnswering.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32)
            rows = reference_checks(loaded.eval(), "vqa", Path(args.reference_dir))
        else:
            rows = reference_checks(loaded, args.task, Path(args.reference_dir))
        title = f"against the recorded outputs in {args.reference_dir}"
    else:
        inputs = _probe_inputs(loaded.config)
        ours, original = probe_outputs(loaded, args.task, inputs), probe_outputs(reference_model, args.task, inputs)
        rows = [(name, ours[name], original[name]) for name in ours]
        title = "against the original weights (fp32, loaded from the original state dict)"
    table, ok = compare(rows, tolerance)
    return f"Parity {title}, tolerance {tolerance}:\n\n{format_table(table)}\n", ok


# ------------------------------------------------------------------------------------------------ outputs
def decoding_section(generation_config) -> str:
    if generation_config is None:
        return ""
    prompt = getattr(generation_config, "decoder_prompt_ids", None)
    return f"""
## Decoding

`generate(**inputs)` with no decoding arguments decodes as the original evaluation: the original mPLUG beam search
(`decoding_mode="original"` in `generation_config.json`: GNMT length penalty, finished beams keep running, an item ends
when its best beam ends), {generation_config.num_beams} beams, {generation_config.min_new_tokens} to
{generation_config.max_new_tokens} new tokens{f", starting from the prompt ids {prompt} (the original feeds the prompt without its last token)" if prompt else ""}.
`model.generate(**inputs, decoding_mode="transformers")` uses transformers' own beam search (or greedy/sampling)
instead; `return_dict_in_generate=True, output_scores=True` returns the original hypothesis scores as
`sequences_scores`.
"""


def model_card(
    args, model, mapping, task_config: dict, parity: str | None, checksum: str, generation_config=None, source=None
) -> str:
    config = model.config
    vision, text = config.vision_config, config.text_config
    task_names = {
        "vqa": "visual question answering",
        "caption": "image captioning",
        "retrieval": "image-text retrieval",
        "grounding": "visual grounding",
        "pretrained": "pretraining (ITC, ITM, MLM, PrefixLM); fine-tune with any task head",
    }
    usage = {
        "vqa": 'inputs = processor(images=image, text="what is in the picture?")\n'
        "print(processor.batch_decode(model.generate(**inputs)))",
        "caption": (
            "inputs = processor(videos=frames)  # a list of PIL frames\n"
            if is_video_task(task_config)
            else "inputs = processor(images=image)\n"
        )
        + "print(processor.batch_decode(model.generate(**inputs)))",
        "retrieval": 'texts = processor(text=["a dog", "a cat"])\n'
        "result = model.retrieve(**processor(images=[image]), **texts, k=2)",
        "grounding": 'batch = processor.prepare_grounding(image, "the dog on the left")\n'
        'prediction = model.predict_boxes(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])\n'
        'print(processor.post_process_grounding(prediction, batch["image_geometry"]))',
        "pretrained": "# every task head loads these weights (the pretraining-only ones are reported as unused):\n"
        "# MPLUGForQuestionAnswering.from_pretrained(folder), MPLUGForRetrieval.from_pretrained(folder), ...\n"
        "loss = model(**batch).loss  # batch from transformers_mplug.data.MPLUGPretrainingCollator",
    }[args.task]
    dropped = "\n".join(f"- {reason}: {len(keys)} keys" for reason, keys in sorted(mapping.dropped.items()))
    schedule = ", ".join("connected" if t == "connected_attention" else "co" for t in config.cross_modal_layer_types)
    return f"""---
library_name: transformers
tags: [mplug, vision-language, {args.task}]
---

# mPLUG — {task_names[args.task]} ({type(model).__name__})

{source_section(args, checksum, source)}
- Saved dtype: {args.dtype}

## Architecture

| part | value |
|---|---|
| vision tower | CLIP ViT, width {vision.hidden_size}, {vision.num_hidden_layers} layers, patch {vision.patch_size}, {vision.image_size} px |
| vision -> text projection | {"yes" if config.has_vision_projection else "no"} |
| text encoder | BERT, width {text.hidden_size}, {text.num_hidden_layers} layers, vocabulary {text.vocab_size} |
| cross-modal encoder | {len(config.cross_modal_layer_types)} layers: {schedule} |
| decoder | {config.num_decoder_layers} layers (BERT with cross-attention) |

Weights of the original file that this model does not need (dropped at conversion):

{dropped or "- none"}

## Usage

```python
import transformers_mplug  # registers the mPLUG classes (or load with trust_remote_code=True)
from transformers_mplug import {type(model).__name__}, MPLUGProcessor

model = {type(model).__name__}.from_pretrained("path/to/this/folder")
processor = MPLUGProcessor.from_pretrained("path/to/this/folder")
{usage}
```
{decoding_section(generation_config)}
## Parity

{parity or "Not verified at conversion (run the converter with `--verify`)."}

## Licence

The mPLUG code and weights are released by Alibaba DAMO Academy in alibaba/AliceMind under that repository's licence
(Apache-2.0 at the time of writing); check it before redistributing these weights.
"""


def source_section(args, checksum: str, source) -> str:
    if source is not None:
        return f"""Converted from a ModelScope mPLUG model folder (`{source.modelscope_task}`) with
`conversion/convert_mplug_original_to_hf.py` of transformers-mplug. The processor reproduces ModelScope's
`MPlugPreprocessor`: texts as `[CLS] text [SEP]`, padded to {MODELSCOPE_TEXT_KWARGS["max_length"]} with truncation
(`default_text_kwargs` in `processor_config.json`).

- Source folder: `{Path(source.path).name}`, weights `pytorch_model.bin` (sha256 `{checksum}`)
- Configs: `config.yaml`, `{source.task_config.get("bert_config", "config_bert.json")}`, `vocab.txt` of that folder"""
    return f"""Converted from the original [alibaba/AliceMind mPLUG](https://github.com/alibaba/AliceMind/tree/main/mPLUG) checkpoint
with `conversion/convert_mplug_original_to_hf.py` of transformers-mplug.

- Source file: `{Path(args.checkpoint_path).name}` (sha256 `{checksum}`)
- Task config: `{Path(args.config_path).name if args.config_path else "(released defaults)"}`; BERT config:
  `{Path(args.bert_config_path).name if args.bert_config_path else "(read from the tensor shapes)"}`"""


def read_source(args: argparse.Namespace):
    """`(state_dict, task_config, bert_config, vocab_path, modelscope folder or None)`; fills `args.task`."""
    if is_modelscope_folder(args.checkpoint_path):
        source = read_modelscope_folder(args.checkpoint_path)
        for name in ("config_path", "bert_config_path", "vocab_path"):
            if getattr(args, name):
                raise ValueError(
                    f"`--{name}` is read from the ModelScope folder {args.checkpoint_path}; do not pass it."
                )
        if args.task is not None and args.task != source.task:
            raise ValueError(
                f"`--task {args.task}` does not match the ModelScope folder: its configuration.json says "
                f"{source.modelscope_task!r} (--task {source.task})."
            )
        args.task = source.task
        return source.state_dict, source.task_config, source.bert_config, source.vocab_file, source
    if os.path.isdir(args.checkpoint_path):
        raise ValueError(
            f"`--checkpoint_path` {args.checkpoint_path} is a directory without configuration.json: pass an AliceMind "
            f"checkpoint file or a ModelScope model folder (tasks {sorted(MODELSCOPE_TASKS)})."
        )
    for name in ("task", "vocab_path"):
        if getattr(args, name) is None:
            raise ValueError(f"`--{name}` is required for an AliceMind checkpoint file.")
    task_config = read_task_config(args.config_path)
    state_dict = load_original_checkpoint(args.checkpoint_path, mmap=True)
    return state_dict, task_config, read_bert_config(args.bert_config_path), args.vocab_path, None


def write_folder(args, model, processor, generation_config, output_dir: Path) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    if not args.no_remote_code:
        transformers_mplug.register_remote_code(type(model))
    to_save = model.to(torch.bfloat16) if args.dtype == "bfloat16" else model
    to_save.save_pretrained(output_dir, safe_serialization=True)
    if args.dtype == "bfloat16":
        model.to(torch.float32)
    processor.save_pretrained(output_dir)
    if generation_config is not None:
        generation_config.save_pretrained(output_dir)


def upload_plan(folder: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(folder)), p.stat().st_size) for p in folder.rglob("*") if p.is_file())


def push(folder: Path, repo_id: str, dry_run: bool) -> int:
    plan = upload_plan(folder)
    print(f"Upload plan for {repo_id}:")
    for name, size in plan:
        print(f"  {name}  ({size} bytes)")
    if dry_run:
        print("dry run: nothing was uploaded")
        return 0
    from huggingface_hub import HfApi

    try:
        api = HfApi()
        api.create_repo(repo_id, exist_ok=True)
        commit = api.upload_folder(
            folder_path=str(folder), repo_id=repo_id, commit_message="Add mPLUG converted from the original checkpoint"
        )
    except Exception as error:  # noqa: BLE001 - report any hub/network failure and fail
        print(f"error: the upload to {repo_id} failed: {type(error).__name__}: {error}", file=sys.stderr)
        return 3
    print(f"uploaded to {commit}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.reference_dir and not args.verify:
        print("error: --reference_dir needs --verify", file=sys.stderr)
        return 2
    try:
        state_dict, task_config, bert_config, vocab_path, source = read_source(args)
        tasks, found = detect_original_tasks(state_dict)
        if tasks and args.task not in tasks:
            raise ValueError(
                f"`--task {args.task}` does not match the checkpoint: its keys hold {found}, so it converts with "
                f"--task {' or --task '.join(sorted(tasks))}."
            )
        model, mapping = build(args, state_dict, task_config, bert_config, modelscope=source is not None)
    except FileNotFoundError as error:  # a path argument that does not exist
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, KeyError, OSError, yaml.YAMLError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"Mapped {len(mapping.state_dict)} tensors into {type(model).__name__}.")
    for reason, keys in sorted(mapping.dropped.items()):
        print(f"Dropped {len(keys)} keys: {reason}")
    try:
        processor = MPLUGProcessor.from_vocab_file(
            vocab_path,
            image_size=model.config.vision_config.image_size,
            model_max_length=model.config.text_config.max_position_embeddings,
            # ModelScope's preprocessor: `[CLS] text [SEP]`, padded to 25 with truncation
            end_text_with_sep=source is not None,
            default_text_kwargs=MODELSCOPE_TEXT_KWARGS if source is not None else None,
        )
    except (ValueError, TypeError, OSError) as error:
        print(f"error: `--vocab_path`: {error}", file=sys.stderr)
        return 2 if isinstance(error, FileNotFoundError) else 1
    if len(processor.tokenizer) != model.config.vocab_size:
        print(
            f"error: `vocab_path` has {len(processor.tokenizer)} tokens, the model {model.config.vocab_size}",
            file=sys.stderr,
        )
        return 1
    output_dir = Path(args.output_dir)
    checksum = sha256(args.checkpoint_path if source is None else source.checkpoint_file)
    generation_config = generation_config_for(model, args.task, task_config, processor)
    write_folder(args, model, processor, generation_config, output_dir)
    parity, ok = None, True
    if args.verify:
        parity, ok = verify(args, output_dir, model, task_config, generation_config)
        print(parity)
    (output_dir / "README.md").write_text(
        model_card(args, model, mapping, task_config, parity, checksum, generation_config, source), encoding="utf-8"
    )
    if not ok:
        print("error: the converted model does not reproduce the original outputs", file=sys.stderr)
        return 4
    print(f"Saved to {output_dir}")
    if args.push_to_hub:
        return push(output_dir, args.push_to_hub, args.dry_run_push)
    return 0


if __name__ == "__main__":
    sys.exit(main())
