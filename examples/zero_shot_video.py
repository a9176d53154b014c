#!/usr/bin/env python
"""Zero-shot video tasks with image checkpoints: frames are sampled uniformly, encoded one by one, and their tokens
concatenated into one memory (as the original's video evaluation).

- video QA by answer ranking (`MPLUGForQuestionAnswering.rank_answers` over a candidate list),
- video captioning with a prompt (`MPLUGForCaptioning.generate`),
- text-to-video retrieval (`MPLUGForRetrieval.retrieve`: video feature = mean of the frames' projected `[CLS]`,
  ITM over the concatenated frame tokens, score = ITM + ITC).

    python examples/zero_shot_video.py --vqa_model mplug-base-vqa --caption_model mplug-base-caption \\
        --retrieval_model mplug-large-retrieval --videos a.mp4 b.mp4 --texts "a man cooking" "a dog running" \\
        --question "what is happening?" --answers cooking running dancing
    python examples/zero_shot_video.py      # mechanics only: tiny random models on embedded moving-shape clips

Video files need PyAV (`pip install av`); `--frame_dirs` takes folders of frame images instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from PIL import Image

from transformers_mplug import MPLUGForCaptioning, MPLUGForQuestionAnswering, MPLUGForRetrieval, MPLUGProcessor
from transformers_mplug.data import draw_scene, shapes_vocabulary
from transformers_mplug.video_utils import sample_video_frames


def embedded_clips(num_clips: int, num_frames: int, size: int) -> tuple[list[list[Image.Image]], list[str]]:
    """Clips of one coloured shape moving around the 2x2 grid, and their descriptions."""
    colors, shapes = ["red", "green", "blue", "yellow"], ["circle", "square", "triangle"]
    clips, texts = [], []
    for index in range(num_clips):
        color, shape = colors[index % 4], shapes[index % 3]
        clips.append([draw_scene([{"color": color, "shape": shape, "cell": t % 4}], size) for t in range(num_frames)])
        texts.append(f"a {color} {shape}")
    return clips, texts


def tiny_models(output_dir: Path, image_size: int):
    """Fresh tiny models and a processor (random weights: the outputs only show the mechanics)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from mplug_examples import demo_config, demo_processor

    processor = demo_processor(output_dir, image_size)
    config = demo_config(
        len(processor.tokenizer),
        image_size=image_size,
        patch_size=16,
        vision_width=32,
        vision_layers=1,
        text_width=32,
        text_layers=1,
        cross_modal_layers=2,
        decoder_layers=1,
    )
    torch.manual_seed(0)
    return (
        MPLUGForQuestionAnswering(config).eval(),
        MPLUGForCaptioning(config).eval(),
        MPLUGForRetrieval(config).eval(),
        processor,
    )


def load_frames(args) -> list[list]:
    if args.videos:
        return [sample_video_frames(path, args.num_frames) for path in args.videos]
    clips = []
    for folder in args.frame_dirs:
        paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
        if not paths:
            raise ValueError(f"{folder} holds no .jpg/.png frames.")
        clips.append(sample_video_frames([Image.open(p).convert("RGB") for p in paths], args.num_frames))
    return clips


@torch.no_grad()
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vqa_model")
    parser.add_argument("--caption_model")
    parser.add_argument("--retrieval_model")
    parser.add_argument("--videos", nargs="*", default=[])
    parser.add_argument("--frame_dirs", nargs="*", default=[])
    parser.add_argument("--texts", nargs="*", default=[])
    parser.add_argument("--question", default="what is in the picture?")
    parser.add_argument("--answers", nargs="*", default=[])
    parser.add_argument("--prompt", default="")
    parser.add_argument("--num_frames", type=int, default=4)
    parser.add_argument("--output_dir", default="outputs/zero_shot_video")
    args = parser.parse_args(argv)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if args.videos and args.frame_dirs:
        parser.error("pass --videos or --frame_dirs, not both")
    models = (args.vqa_model, args.caption_model, args.retrieval_model)
    if any(models) and not all(models):
        parser.error("pass all of --vqa_model, --caption_model, --retrieval_model (or none for the tiny demo)")
    if all(models):
        vqa = MPLUGForQuestionAnswering.from_pretrained(args.vqa_model).eval()
        captioner = MPLUGForCaptioning.from_pretrained(args.caption_model).eval()
        retriever = MPLUGForRetrieval.from_pretrained(args.retrieval_model).eval()
        processor = MPLUGProcessor.from_pretrained(args.vqa_model)
    else:
        vqa, captioner, retriever, processor = tiny_models(output_dir, image_size=32)
    if args.videos or args.frame_dirs:
        clips, texts = load_frames(args), args.texts
        if not texts:
            parser.error("--texts (the retrieval captions) are needed with --videos/--frame_dirs")
    else:
        clips, texts = embedded_clips(3, args.num_frames, processor.image_processor.size["height"])
    answers = args.answers or [w for w in shapes_vocabulary() if w in {"red", "green", "blue", "yellow", "circle"}]

    videos = processor(videos=clips)["pixel_values"]  # (B, T, C, H, W)
    result: dict = {"num_videos": len(clips), "frames_per_video": videos.shape[1]}
    question = processor(text=[args.question] * len(clips))
    candidates = processor.encode_text(answers, add_eos=True)
    ranked = vqa.rank_answers(
        candidates["input_ids"],
        candidates["attention_mask"],
        pixel_values=videos,
        input_ids=question["input_ids"],
        attention_mask=question["attention_mask"],
        k=min(3, len(answers)),
    )
    result["video_qa"] = [answers[int(i)] for i in ranked.indices[:, 0]]
    prompt = None
    if args.prompt:
        prompt = processor(text=[args.prompt] * len(clips))["input_ids"]
    captions = captioner.generate(pixel_values=videos, input_ids=prompt, num_beams=3, max_new_tokens=8)
    result["captions"] = processor.batch_decode(captions)
    text_inputs = processor(text=texts)
    retrieval = retriever.retrieve(
        pixel_values=videos, **text_inputs, k=min(4, len(texts)), frame_pooling="mean", add_itc_score=True
    )
    result["text_to_video"] = {text: int(retrieval.text_to_image_indices[i, 0]) for i, text in enumerate(texts)}
    for key, value in result.items():
        print(f"{key}: {value}")
    (output_dir / "results.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    return result


if __name__ == "__main__":
    main()
