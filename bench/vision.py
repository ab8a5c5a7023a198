"""Time to first token for a one-image request through mlxgate against mlx-vlm called directly in
one process, same model, same image, same run; and the vision model server's memory.

- mlx-vlm direct: `mlx_vlm.load` + `stream_generate` in this process, the prompt rendered by the
  model's chat template with one image; the clock starts with the message and the image as its
  file's bytes (the template's rendering and the image's decoding are counted, as a server
  counts them);
- mlxgate: `POST /v1/chat/completions` streamed, the image as a data URL, through the proxy, the
  relay (image checks and counting) and the vision model's server; the body is encoded once,
  before the clock (a client's JSON encoder is not the gateway's cost).

The model is a tiny random-weight Qwen2.5-VL from `mlxgate demo-model --vision` unless --model
names a folder. Needs the vision extra (./install.sh --vision).

    .venv/bin/python bench/vision.py --runs 10 --size 448
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import psutil
import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stack import Gateway, headers, median, model_folders  # noqa: E402

PROMPT = "Describe the image."


def noise_png(size: int) -> bytes:
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def direct(folder: Path, image: bytes, runs: int) -> list[float]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from mlx_vlm import load, stream_generate
    from mlx_vlm.prompt_utils import get_chat_template
    from PIL import Image

    from mlxgate.vision.tokens import capped_max_pixels

    model, processor = load(str(folder))
    if capped_max_pixels(folder):
        processor.image_processor.max_pixels = capped_max_pixels(folder)  # as the model server does
    times = []
    for _ in range(runs + 1):  # the first warms up
        began = time.perf_counter()  # from the message and the file's bytes, as a server has them
        prompt = get_chat_template(processor, [{"role": "user", "content": [{"type": "text", "text": PROMPT},
                                                                             {"type": "image"}]}], True)
        picture = Image.open(io.BytesIO(image)).convert("RGB")
        for _ in stream_generate(model, processor, prompt, image=[picture], max_tokens=4, temperature=0.0):
            times.append((time.perf_counter() - began) * 1000)
            break
    return times[1:]


def through(gateway: Gateway, image: bytes, runs: int) -> list[float]:
    url = gateway.url + "/v1/chat/completions"
    body = {"model": "vision", "max_tokens": 4, "stream": True, "messages": [{"role": "user", "content": [
        {"type": "text", "text": PROMPT},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(image).decode()}}]}]}
    data = json.dumps(body).encode()  # once: the client's own encoding of 0.8 MB is not the gateway's cost
    times = []
    session = requests.Session()
    for _ in range(runs + 1):
        began = time.perf_counter()
        with session.post(url, data=data, headers=headers(gateway.key), stream=True, timeout=300) as answer:
            answer.raise_for_status()
            for line in answer.iter_lines():
                if line.startswith(b"data: ") and b'"content"' in line:
                    times.append((time.perf_counter() - began) * 1000)
                    break
            for _ in answer.iter_lines():
                pass
    return times[1:]


def vision_rss() -> int:
    """Resident bytes of the vision model server (the process running mlxgate.vision.entry)."""
    for process in psutil.process_iter(["cmdline"]):
        if "mlxgate.vision.entry" in " ".join(process.info["cmdline"] or []):
            return process.memory_info().rss
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--size", type=int, default=448, help="the image's side in pixels (random noise)")
    parser.add_argument("--model", type=Path, help="a vision model folder (default: a tiny Qwen2.5-VL)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mlxgate-bench-vision-"))
    models, folder = model_folders(work, "vision", args.model, "--vision")
    image = noise_png(args.size)
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    mine = direct(folder, image, args.runs)
    gateway = Gateway(work, [models], "--default-model", "chat")
    try:
        served = through(gateway, image, args.runs)
        rss = vision_rss()
    finally:
        gateway.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}\n")
    print(f"one {args.size}x{args.size} PNG, {args.runs} runs, time to first token (ms)")
    print(f"{'path':20} {'median':>8} {'min':>8}")
    for name, times in (("mlx-vlm direct", mine), ("mlxgate", served)):
        print(f"{name:20} {median(times):8.1f} {min(times):8.1f}")
    print(f"ratio (median): {median(served) / median(mine):.2f}x")
    print(f"vision model server RSS after the runs: {rss / 2**20:.0f} MB")


if __name__ == "__main__":
    main()
