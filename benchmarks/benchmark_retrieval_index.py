#!/usr/bin/env python
"""MPLUGRetrievalIndex at growing gallery sizes: build time per image, the latency of one text query (ITC top
candidates from faiss, then ITM over their stored tokens), and the peak resident memory of a fresh process that loads
the index and answers queries (it should not grow with the gallery: the tokens stay on disk).

A tiny model (benchmark_mplug.py's tiny size, random weights, 32 px images, 5 image tokens) gives the token states; the images are random pixels.

    python benchmarks/benchmark_retrieval_index.py                        # galleries 1k, 10k, 100k
    python benchmarks/benchmark_retrieval_index.py --galleries 1000 5000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from benchmark_mplug import SIZES, mplug_config

from transformers_mplug import MPLUGForRetrieval, MPLUGRetrievalIndex

# a fresh process: load the index, answer `queries` text queries, report the latency and VmHWM
QUERY = r"""
import json, statistics, sys, time, torch
sys.path.insert(0, {here!r})
from benchmark_retrieval_index import tiny_model
from transformers_mplug import MPLUGRetrievalIndex
model = tiny_model()
index = MPLUGRetrievalIndex.load({folder!r}, model)
ids = torch.randint(110, 128, ({queries}, 12), generator=torch.Generator().manual_seed(1))
ids[:, 0] = 101
index.search(model, input_ids=ids[:1], k=10, num_candidates=16)  # warm-up
times = []
for row in range({queries}):
    start = time.perf_counter()
    index.search(model, input_ids=ids[row : row + 1], k=10, num_candidates=16)
    times.append(time.perf_counter() - start)
peak = [line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM")][0]
print(json.dumps({{"query_seconds": statistics.median(times), "peak_kb": int(peak)}}))
"""


def tiny_model() -> MPLUGForRetrieval:
    """benchmark_mplug's tiny size at 32 px (5 image tokens)."""
    torch.manual_seed(0)
    return MPLUGForRetrieval(mplug_config(SIZES["tiny"], image_size=32, projection_dim=32)).eval()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--galleries", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--batch_size", type=int, default=512)
    parser.add_argument("--queries", type=int, default=20)
    args = parser.parse_args()
    model = tiny_model()
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for gallery in args.galleries:
            folder = Path(work) / f"index_{gallery}"
            pixels = torch.randn(gallery, 3, 32, 32, generator=torch.Generator().manual_seed(gallery))
            start = time.perf_counter()
            MPLUGRetrievalIndex.build(model, pixels, folder, batch_size=args.batch_size, progress=False)
            build = time.perf_counter() - start
            del pixels
            code = QUERY.format(here=str(Path(__file__).parent), folder=str(folder), queries=args.queries)
            result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            measured = json.loads(result.stdout.strip().splitlines()[-1])
            size = sum(p.stat().st_size for p in folder.iterdir())
            rows.append(
                {
                    "gallery": gallery,
                    "build_ms_per_image": 1000 * build / gallery,
                    "query_ms": 1000 * measured["query_seconds"],
                    "search_process_peak_mb": measured["peak_kb"] / 1024,
                    "index_on_disk_mb": size / 2**20,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    keys = list(rows[0])
    print("\n| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(f"{row[k]:.3g}" if isinstance(row[k], float) else str(row[k]) for k in keys) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
