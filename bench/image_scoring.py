"""Multimodal teacher scoring: what images cost, and what sending each image once per request saves.

    python bench/image_scoring.py [--backends hf vllm] [--requests 24] [--group 4] [--repeats 3]

A tiny random Idefics3 teacher (64x64 images -> 19 image tokens each) scores requests of `--group` rollouts of one
image prompt, like a trainer scoring a group. Reported per backend: scored (response) tokens per second for the image
items and for the same token sequences with the images removed (mean ± std over repeats), and request bytes per
group when the image travels once versus once per item.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from proto.client import TeacherClient
from proto.codec import encode_score_request
from proto.schemas import ScoreItem
from uniopd.launch import start_teacher
from uniopd.tiny_models import build_tiny_vlm

IMAGE_TOKEN = 512


def png(rng: np.random.Generator) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def make_groups(n: int, group: int, prompt: int, response: int, seed: int = 0):
    """(items with one image each, the same items without it, the image) per request."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        head = [1, IMAGE_TOKEN, *rng.integers(3, 512, prompt - 2).tolist()]
        rows = [head + rng.integers(3, 512, response).tolist() for _ in range(group)]
        with_image = [ScoreItem(input_ids=r, response_start=prompt, image_indices=[0]) for r in rows]
        text = [ScoreItem(input_ids=[t if t != IMAGE_TOKEN else 5 for t in r], response_start=prompt) for r in rows]
        out.append((with_image, text, png(rng)))
    return out


async def rate(url: str, groups, images: bool) -> float:
    async with TeacherClient(url) as client:
        first = groups[0]
        await client.score(first[0], [first[2]]) if images else await client.score(first[1])
        start = time.perf_counter()
        await asyncio.gather(*(client.score(g[0], [g[2]]) if images else client.score(g[1]) for g in groups))
        elapsed = time.perf_counter() - start
    return sum(len(it.input_ids) - it.response_start for g in groups for it in g[0]) / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", nargs="+", default=["hf", "vllm"])
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=24)
    ap.add_argument("--response", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    model = build_tiny_vlm(Path(tempfile.mkdtemp()) / "tiny-vlm")
    groups = make_groups(args.requests, args.group, args.prompt, args.response)
    items, _, image = groups[0]
    once = len(encode_score_request(items, True, [image]))
    each = len(encode_score_request([it.model_copy(update={"image_indices": [i]}) for i, it in enumerate(items)],
                                    True, [image] * len(items)))
    print(f"request bytes per group of {args.group} (msgpack): image once {once}, image per item {each} "
          f"({each / once:.2f}x); PNG {len(image)} bytes")
    print("| backend | image items, tokens/s | same tokens without images, tokens/s |")
    print("|---|---|---|")
    for backend in args.backends:
        with start_teacher(model, backend, ["--dtype", "float32"]) as server:
            cells = []
            for images in (True, False):
                runs = [asyncio.run(rate(server.url, groups, images)) for _ in range(args.repeats)]
                cells.append(f"{statistics.mean(runs):,.0f} ± {statistics.stdev(runs):,.0f}")
            print(f"| {backend} | {cells[0]} | {cells[1]} |", flush=True)


if __name__ == "__main__":
    main()
