#!/usr/bin/env python
"""Speed and memory of mPLUG on this machine: prints markdown tables and writes `results.json` and `results.png`.

Sections (random weights; medians of `--repeats` runs after a warm-up; everything measured in this one run):

1. VQA `generate` (5 beams, 10 new tokens forced) at base size: ours vs transformers' `BlipForQuestionAnswering` at
   the same widths/depths, batch 1 and `--batch_size`; ours with the KV cache off; eager vs SDPA; fp32 vs bf16
   (both run transformers' beam search). 1b: the original mPLUG beam search (`decoding_mode="original"`) against
   transformers' beam search on the same model, batch 1 and `--batch_size`. 1c: the encoders, greedy decoding and
   beam-5 decoding timed separately (decode = generate minus encoders), with the floor ratio beam / greedy decode.
2. `rank_answers` (k = 16, 128) over `--num_candidates` candidate answers, against one beam-5 `generate`.
3. Trunk forward for different cross-modal schedules (all connected, all co-attention, skip-connected S = 1..6):
   time and FLOPs.
4. A VQA training step (batch 8): with and without gradient checkpointing, time and peak memory (each in a fresh
   process, peak resident memory).
5. Corpus retrieval (`retrieve`, ITC only and ITC top-k -> ITM) against the gallery size, at `--retrieval_size`.
   5b. ITM re-rank of one image against `--itm_texts` texts: shared image keys/values against per pair.
6. Parameters of a base VQA model (what runs) and its resident memory, against the original's 983 M.

    python benchmarks/benchmark_mplug.py                 # base size, about 10 minutes on 2 CPU cores
    python benchmarks/benchmark_mplug.py --size tiny     # a seconds-long smoke run of every section
    python benchmarks/benchmark_mplug.py --sections decoding   # only section 1b
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import BlipConfig, BlipForQuestionAnswering

from transformers_mplug import MPLUGConfig, MPLUGForQuestionAnswering, MPLUGForRetrieval

# the original mPLUG-base VQA checkpoint (reference/keys/summary.json: unique parameters of the released model)
ORIGINAL_BASE_VQA_PARAMETERS = 982_833_270

SIZES = {
    # ViT-B/16 at 384 px (577 image tokens), BERT-base widths: 6 text + 6 fusion + 12 decoder layers
    "base": dict(image=384, patch=16, width=768, heads=12, vision_layers=12, text_layers=6, fusion=6, decoder=12),
    "tiny": dict(image=64, patch=16, width=64, heads=2, vision_layers=2, text_layers=1, fusion=2, decoder=2),
}


def mplug_config(size: dict, **overrides) -> MPLUGConfig:
    width = size["width"]
    args = dict(
        vision_config=dict(
            hidden_size=width,
            intermediate_size=4 * width,
            num_hidden_layers=size["vision_layers"],
            num_attention_heads=size["heads"],
            image_size=size["image"],
            patch_size=size["patch"],
        ),
        text_config=dict(
            vocab_size=30522,
            hidden_size=width,
            num_hidden_layers=size["text_layers"],
            num_attention_heads=size["heads"],
            intermediate_size=4 * width,
        ),
        num_cross_modal_layers=size["fusion"],
        connected_attention_stride=3,
        num_decoder_layers=size["decoder"],
    )
    args.update(overrides)
    return MPLUGConfig(**args)


def blip_model(size: dict) -> BlipForQuestionAnswering:
    width = size["width"]
    config = BlipConfig(
        vision_config=dict(
            hidden_size=width,
            intermediate_size=4 * width,
            num_hidden_layers=size["vision_layers"],
            num_attention_heads=size["heads"],
            image_size=size["image"],
            patch_size=size["patch"],
        ),
        text_config=dict(
            hidden_size=width,
            intermediate_size=4 * width,
            num_hidden_layers=size["text_layers"] + size["fusion"],
            num_attention_heads=size["heads"],
            encoder_hidden_size=width,
        ),
    )
    return BlipForQuestionAnswering(config).eval()


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def question(batch_size: int, size: dict, vocab: int = 30522):
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, vocab - 10, (batch_size, 8), generator=generator)
    ids[:, 0] = 101
    return {
        "pixel_values": torch.randn(batch_size, 3, size["image"], size["image"], generator=generator),
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
    }


FORCED = dict(num_beams=5, min_new_tokens=10, max_new_tokens=10)
# section 1 compares with BLIP, whose generate runs transformers' beam search: ours runs the same algorithm there
TRANSFORMERS_BEAM = dict(FORCED, decoding_mode="transformers")


@torch.no_grad()
def bench_generate(size: dict, args) -> list[dict]:
    rows = []
    models = {}
    for attn in ("sdpa", "eager"):
        torch.manual_seed(0)
        models[attn] = MPLUGForQuestionAnswering(mplug_config(size, attn_implementation=attn)).eval()
    blip = blip_model(size)
    for batch_size in (1, args.batch_size):
        inputs = question(batch_size, size)
        blip_time = timed(lambda b=blip, x=inputs: b.generate(**x, **FORCED), args.repeats)
        rows.append({"model": "BLIP (transformers)", "batch": batch_size, "dtype": "fp32", "seconds": blip_time})
        for attn, model in models.items():
            ours = timed(lambda m=model, x=inputs: m.generate(**x, **TRANSFORMERS_BEAM), args.repeats)
            rows.append(
                {
                    "model": f"mPLUG {attn}",
                    "batch": batch_size,
                    "dtype": "fp32",
                    "seconds": ours,
                    "vs_blip": ours / blip_time,
                }
            )
        model = models["sdpa"]
        no_cache = timed(
            lambda m=model, x=inputs: m.generate(**x, **TRANSFORMERS_BEAM, use_cache=False), max(1, args.repeats // 2)
        )
        rows.append(
            {
                "model": "mPLUG sdpa, no KV cache",
                "batch": batch_size,
                "dtype": "fp32",
                "seconds": no_cache,
                "vs_blip": no_cache / blip_time,
            }
        )
        if args.bf16:
            model_bf16 = models["sdpa"].to(torch.bfloat16)
            blip_bf16 = blip.to(torch.bfloat16)
            bf16_inputs = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in inputs.items()}
            blip_b = timed(lambda b=blip_bf16, x=bf16_inputs: b.generate(**x, **FORCED), args.repeats)
            ours_b = timed(lambda m=model_bf16, x=bf16_inputs: m.generate(**x, **TRANSFORMERS_BEAM), args.repeats)
            rows.append({"model": "BLIP (transformers)", "batch": batch_size, "dtype": "bf16", "seconds": blip_b})
            rows.append(
                {
                    "model": "mPLUG sdpa",
                    "batch": batch_size,
                    "dtype": "bf16",
                    "seconds": ours_b,
                    "vs_blip": ours_b / blip_b,
                }
            )
            models["sdpa"], blip = model_bf16.float(), blip_bf16.float()
    return rows


@torch.no_grad()
def bench_decoding(size: dict, args) -> list[dict]:
    """The original beam search (`decoding_mode="original"`, the default of converted folders) against transformers'
    beam search on the same model, 5 beams, 10 new tokens forced (the same number of decoder steps for both): the
    whole `generate`, and with the image features given (`image_embeds`), where the decoding is most of the time."""
    torch.manual_seed(0)
    model = MPLUGForQuestionAnswering(mplug_config(size)).eval()
    rows = []
    for batch_size in (1, args.batch_size):
        inputs = question(batch_size, size)
        image_embeds = model.mplug.encode_image(inputs["pixel_values"])[1]
        calls = {
            "generate": inputs,
            "generate, image_embeds given": {
                "image_embeds": image_embeds,
                "input_ids": inputs["input_ids"],
                "attention_mask": inputs["attention_mask"],
            },
        }
        for call, call_inputs in calls.items():
            # the two modes alternate call by call, so that a slow moment of the machine hits both
            samples: dict[str, list[float]] = {"transformers": [], "original": []}
            for repeat in range(args.repeats + 1):
                for mode in samples:
                    start = time.perf_counter()
                    model.generate(**call_inputs, **FORCED, decoding_mode=mode)
                    if repeat:  # the first round is the warm-up
                        samples[mode].append(time.perf_counter() - start)
            times = {mode: statistics.median(values) for mode, values in samples.items()}
            for mode, seconds in times.items():
                rows.append(
                    {
                        "call": call,
                        "decoding_mode": mode,
                        "batch": batch_size,
                        "seconds": seconds,
                        "vs_transformers": seconds / times["transformers"],
                    }
                )
    return rows


@torch.no_grad()
def bench_floor(size: dict, args) -> list[dict]:
    """Where a VQA call's time goes: the encoders (vision + text + fusion, `_fused_memory`), then decoding 10 forced
    steps = `generate` minus the encoders, for greedy (one row per question: the decoder's weights read once a step)
    and 5 beams (both decoding modes). `floor` = beam decode / greedy decode: 1.0 would mean beam search costs no more
    than the one weight pass per step that greedy decoding needs."""
    torch.manual_seed(0)
    model = MPLUGForQuestionAnswering(mplug_config(size)).eval()
    greedy = dict(num_beams=1, min_new_tokens=10, max_new_tokens=10, decoding_mode="transformers")
    rows = []
    for batch_size in (1, args.batch_size):
        inputs = question(batch_size, size)
        calls = {
            "encoders": lambda inputs=inputs: model._fused_memory(
                inputs["pixel_values"], inputs["input_ids"], None, None
            ),
            "greedy": lambda inputs=inputs: model.generate(**inputs, **greedy),
            "beam 5, original": lambda inputs=inputs: model.generate(**inputs, **FORCED, decoding_mode="original"),
            "beam 5, transformers": lambda inputs=inputs: model.generate(
                **inputs, **FORCED, decoding_mode="transformers"
            ),
        }
        samples: dict[str, list[float]] = {name: [] for name in calls}
        for repeat in range(args.repeats + 1):  # interleaved, so that a slow moment of the machine hits every call
            for name, call in calls.items():
                start = time.perf_counter()
                call()
                if repeat:
                    samples[name].append(time.perf_counter() - start)
        times = {name: statistics.median(values) for name, values in samples.items()}
        greedy_decode = times["greedy"] - times["encoders"]
        for name, seconds in times.items():
            decode = seconds - times["encoders"] if name != "encoders" else None
            rows.append(
                {
                    "batch": batch_size,
                    "call": name,
                    "seconds": seconds,
                    "decode_seconds": decode,
                    "floor": decode / greedy_decode if decode is not None else None,
                }
            )
    return rows


@torch.no_grad()
def bench_rank(size: dict, args) -> list[dict]:
    torch.manual_seed(0)
    model = MPLUGForQuestionAnswering(mplug_config(size)).eval()
    inputs = question(1, size)
    generator = torch.Generator().manual_seed(1)
    candidates = torch.randint(1000, 30000, (args.num_candidates, 4), generator=generator)
    candidates[:, 0], candidates[:, -1] = 101, 102
    beam = timed(lambda: model.generate(**inputs, **FORCED), args.repeats)
    rows = [{"call": "generate (5 beams, 10 tokens)", "seconds": beam, "vs_generate": 1.0}]
    for k in (16, 128):
        seconds = timed(lambda k=k: model.rank_answers(candidates, k=k, **inputs), args.repeats)
        rows.append(
            {"call": f"rank_answers k={k} of {args.num_candidates}", "seconds": seconds, "vs_generate": seconds / beam}
        )
    return rows


@torch.no_grad()
def bench_schedules(size: dict, args) -> list[dict]:
    from transformers_mplug import MPLUGModel

    layers = size["fusion"]
    schedules = {"all connected (ViLT-like)": ["co_attention"] + ["connected_attention"] * (layers - 1)}
    schedules["all co-attention (ALBEF-like)"] = ["co_attention"] * layers
    for stride in range(1, layers + 1):
        schedules[f"skip-connected S={stride}"] = None
    rows = []
    inputs = question(args.batch_size, size)
    for name, schedule in schedules.items():
        torch.manual_seed(0)
        if schedule is None:
            config = mplug_config(size, connected_attention_stride=int(name.split("=")[1]))
        else:
            config = mplug_config(size, cross_modal_layer_types=schedule, connected_attention_stride=None)
        model = MPLUGModel(config).eval()
        with FlopCounterMode(display=False) as counter:
            model(**inputs)
        seconds = timed(lambda m=model: m(**inputs), args.repeats)
        fusion_flops = None
        with FlopCounterMode(display=False) as fusion_counter:
            image = model.encode_image(inputs["pixel_values"])[1]
            text = model.encode_text(inputs["input_ids"], inputs["attention_mask"])
        fusion_flops = counter.get_total_flops() - fusion_counter.get_total_flops()
        rows.append(
            {
                "schedule": name,
                "layers": "".join("C" if t == "connected_attention" else "c" for t in config.cross_modal_layer_types),
                "seconds": seconds,
                "gflops": counter.get_total_flops() / 1e9,
                "fusion_gflops": fusion_flops / 1e9,
            }
        )
        del image, text
    return rows


TRAIN_STEP = r"""
import json, resource, sys, time, torch
sys.path.insert(0, {here!r})
from benchmark_mplug import SIZES, mplug_config, question
from transformers_mplug import MPLUGForQuestionAnswering
size, checkpointing, batch = SIZES[{size!r}], {checkpointing}, {batch}
torch.manual_seed(0)
model = MPLUGForQuestionAnswering(mplug_config(size)).train()
if checkpointing:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={{"use_reentrant": False}})
inputs = question(batch, size)
labels = torch.randint(1000, 30000, (batch, 5)); labels[:, 0] = 101; labels[:, -1] = 102
import os
before = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1024  # resident, KiB
times = []
for _ in range(3):
    start = time.perf_counter()
    model(**inputs, labels=labels).loss.backward()
    times.append(time.perf_counter() - start)
    model.zero_grad(set_to_none=True)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"seconds": sorted(times)[1], "peak_mb": peak / 1024, "increase_mb": (peak - before) / 1024}}))
"""


def bench_training(args) -> list[dict]:
    rows = []
    for checkpointing in (False, True):
        code = TRAIN_STEP.format(
            here=str(Path(__file__).parent), size=args.size, checkpointing=checkpointing, batch=args.train_batch_size
        )
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
        if result.returncode != 0:
            raise RuntimeError(result.stderr[-2000:])
        row = json.loads(result.stdout.strip().splitlines()[-1])
        rows.append({"gradient_checkpointing": checkpointing, "batch": args.train_batch_size, **row})
    return rows


@torch.no_grad()
def bench_retrieval(args) -> list[dict]:
    size = SIZES[args.retrieval_size]
    torch.manual_seed(0)
    model = MPLUGForRetrieval(mplug_config(size, projection_dim=256)).eval()
    rows = []
    for gallery in args.galleries:
        generator = torch.Generator().manual_seed(gallery)
        # a gallery of image features (the vision tower's cost is linear and the same for both methods)
        image_embeds = torch.randn(
            gallery, model.config.num_image_tokens, model.config.hidden_size, generator=generator
        )
        ids = torch.randint(1000, 30000, (gallery, 12), generator=generator)
        ids[:, 0] = 101
        start = time.perf_counter()
        text = model.get_text_features(ids).pooler_output
        image = model.get_image_features(image_embeds=image_embeds).pooler_output
        similarity = image @ text.t()
        similarity.topk(min(10, gallery), dim=1)
        itc = time.perf_counter() - start
        start = time.perf_counter()
        model.retrieve(image_embeds=image_embeds, input_ids=ids, k=args.retrieval_k, batch_size=256)
        itm = time.perf_counter() - start
        rows.append({"gallery": gallery, "itc_seconds": itc, "itc_itm_seconds": itm, "k": args.retrieval_k})
    return rows


def bench_itm_sharing(size: dict, args) -> list[dict]:
    """ITM re-ranking of one image against `--itm_texts` texts: each co-attention layer projecting the image to
    keys/values once (`image_index`, what `retrieve` does) against once per pair, for the base schedule (connected
    attention at layer 3) and the large one (six co-attention layers)."""
    return [
        itm_sharing_row(size, name, stride, args.itm_texts, args.repeats)
        for name, stride in (("base (connected at 3)", 3), ("large (all co-attention)", 6))
    ]


def itm_sharing_row(size: dict, name: str, stride: int, k: int, repeats: int) -> dict:
    torch.manual_seed(0)
    model = MPLUGForRetrieval(mplug_config(size, projection_dim=256, connected_attention_stride=stride)).eval()
    config = model.config
    image = torch.randn(1, config.num_image_tokens, config.hidden_size)
    texts = torch.randn(k, 30, config.hidden_size)
    mask = torch.ones(k, 30, dtype=torch.long)
    index = torch.zeros(k, dtype=torch.long)

    def per_pair_logits():
        return model._itm_logits(image.expand(k, -1, -1).contiguous(), texts, mask)

    def shared_logits():
        return model._itm_logits(image, texts, mask, image_index=index)

    with torch.no_grad():
        per_pair, shared = timed(per_pair_logits, repeats), timed(shared_logits, repeats)
        difference = float((per_pair_logits() - shared_logits()).abs().max())
    return {
        "schedule": name,
        "texts": k,
        "per_pair_seconds": per_pair,
        "shared_seconds": shared,
        "speedup": per_pair / shared,
        "max_abs_diff": difference,
    }


RESIDENT = r"""
import json, os, sys, torch
sys.path.insert(0, {here!r})
from benchmark_mplug import SIZES, mplug_config
from transformers_mplug import MPLUGForQuestionAnswering

def resident_bytes():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

before = resident_bytes()
model = MPLUGForQuestionAnswering(mplug_config(SIZES[{size!r}])).eval()
print(json.dumps({{"parameters": sum(p.numel() for p in model.parameters()), "resident_bytes": resident_bytes() - before}}))
"""


def bench_parameters(args) -> dict:
    """Parameters of a VQA model (only what runs) and the resident memory it adds, in a fresh process."""
    code = RESIDENT.format(here=str(Path(__file__).parent), size=args.size)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-2000:])
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    parameters = measured["parameters"]
    return {
        "parameters": parameters,
        "fp32_gb": parameters * 4 / 1e9,
        "resident_gb": measured["resident_bytes"] / 1e9,
        "original_parameters": ORIGINAL_BASE_VQA_PARAMETERS,
        "ratio_to_original": parameters / ORIGINAL_BASE_VQA_PARAMETERS,
    }


def table(rows: list[dict]) -> str:
    if not rows:
        return ""
    keys = list(dict.fromkeys(k for row in rows for k in row))

    def cell(value):
        if isinstance(value, float):
            return f"{value:.3g}"
        return str(value)

    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(row.get(k, "")) for k in keys) + " |" for row in rows]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(15, 4))
    generate = [r for r in results["generate"] if r["dtype"] == "fp32"]
    labels = [f"{r['model']}\nbatch {r['batch']}" for r in generate]
    axes[0].barh(labels, [r["seconds"] for r in generate], color="tab:blue")
    axes[0].set_xlabel("seconds (5 beams, 10 tokens)")
    axes[0].tick_params(axis="y", labelsize=7)
    schedules = results["schedules"]
    axes[1].bar(range(len(schedules)), [r["seconds"] for r in schedules], color="tab:green")
    axes[1].set_xticks(range(len(schedules)), [r["layers"] for r in schedules], rotation=45, fontsize=7)
    axes[1].set_ylabel("trunk forward, seconds")
    axes[1].set_title("cross-modal schedule (C = connected)")
    retrieval = results["retrieval"]
    axes[2].plot([r["gallery"] for r in retrieval], [r["itc_seconds"] for r in retrieval], "o-", label="ITC")
    axes[2].plot(
        [r["gallery"] for r in retrieval], [r["itc_itm_seconds"] for r in retrieval], "o-", label="ITC top-k -> ITM"
    )
    axes[2].set_xlabel("gallery size")
    axes[2].set_ylabel("seconds")
    axes[2].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="base")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--train_batch_size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num_candidates", type=int, default=3128)
    parser.add_argument("--retrieval_size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--retrieval_k", type=int, default=16)
    parser.add_argument("--itm_texts", type=int, default=128, help="section 5b: texts re-ranked against one image")
    parser.add_argument("--galleries", type=int, nargs="+", default=[100, 500, 1000, 2500, 5000])
    parser.add_argument("--no_bf16", dest="bf16", action="store_false")
    parser.add_argument("--output_dir", default="outputs/benchmarks")
    parser.add_argument("--sections", nargs="+", help="run only these sections (e.g. decoding); default: all")
    args = parser.parse_args(argv)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    size = SIZES[args.size]
    results = {"size": args.size, "threads": torch.get_num_threads(), "torch": torch.__version__}
    sections = [
        ("generate", "1. VQA generate, 5 beams, 10 new tokens", lambda: bench_generate(size, args)),
        ("decoding", "1b. Original beam search vs transformers' beam search", lambda: bench_decoding(size, args)),
        (
            "floor",
            "1c. Encoders, greedy and beam-5 decoding separately (floor = beam / greedy decode)",
            lambda: bench_floor(size, args),
        ),
        ("rank", "2. Closed-vocabulary ranking vs one beam-5 generate", lambda: bench_rank(size, args)),
        ("schedules", "3. Trunk forward by cross-modal schedule", lambda: bench_schedules(size, args)),
        ("training", "4. VQA training step", lambda: bench_training(args)),
        ("retrieval", f"5. Corpus retrieval ({args.retrieval_size} size)", lambda: bench_retrieval(args)),
        ("itm_sharing", "5b. ITM re-rank: shared image keys/values vs per pair", lambda: bench_itm_sharing(size, args)),
    ]
    if args.sections:
        unknown = sorted(set(args.sections) - {key for key, _, _ in sections} - {"parameters"})
        if unknown:
            parser.error(f"unknown --sections {unknown}; choose from {[k for k, _, _ in sections] + ['parameters']}")
        sections = [section for section in sections if section[0] in args.sections]
    started = time.perf_counter()
    for key, title, run in sections:
        section_start = time.perf_counter()
        results[key] = run()
        print(f"\n### {title} ({time.perf_counter() - section_start:.0f} s)\n\n{table(results[key])}", flush=True)
    if not args.sections or "parameters" in args.sections:
        results["parameters"] = bench_parameters(args)
        print(f"\n### 6. Parameters of a {args.size} VQA model\n\n{table([results['parameters']])}")
    results["total_seconds"] = time.perf_counter() - started
    (output_dir / "results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    written = [output_dir / "results.json"]
    if all(key in results for key in ("generate", "schedules", "retrieval")):
        plot(results, output_dir / "results.png")
        written.append(output_dir / "results.png")
    print(f"\nwrote {' and '.join(map(str, written))} in {results['total_seconds']:.0f} s")
    return results


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
