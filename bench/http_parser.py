"""What the servers' HTTP parser costs: uvicorn's h11 (which the servers use, for its header-size limit) vs
httptools (uvicorn's default when installed, which buffers a header block of any size).

    python bench/http_parser.py [--requests 200] [--repeats 3]

One client connection POSTs bodies of 1 KiB and 1 MiB to a minimal ASGI app that reads the whole body, so the time
is the parser's and the transport's. Reported: mean ± std over the repeats of the milliseconds per round trip.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import time

import httpx

APP = """
import sys, uvicorn
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", http=sys.argv[2])
"""
PARSERS = ("h11", "httptools")
SIZES = (1 << 10, 1 << 20)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_repeat(parser: str, requests: int) -> dict[int, float]:
    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", APP, str(port), parser])
    try:
        url = f"http://127.0.0.1:{port}/"
        with httpx.Client() as client:
            for _ in range(100):
                try:
                    client.get(url)
                    break
                except httpx.TransportError:
                    time.sleep(0.1)
            ms = {}
            for size in SIZES:
                body = b"x" * size
                start = time.perf_counter()
                for _ in range(requests):
                    client.post(url, content=body)
                ms[size] = (time.perf_counter() - start) / requests * 1e3
            return ms
    finally:
        server.terminate()
        server.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    runs = {p: [one_repeat(p, args.requests) for _ in range(args.repeats)] for p in PARSERS}
    print("| parser | " + " | ".join(f"ms per {s >> 10} KiB POST" for s in SIZES) + " |")
    print("|---|" + "---|" * len(SIZES))
    for parser, reps in runs.items():
        cells = [f"{statistics.mean(r[s] for r in reps):.2f} ± {statistics.stdev(r[s] for r in reps):.2f}"
                 for s in SIZES]
        print(f"| {parser} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
