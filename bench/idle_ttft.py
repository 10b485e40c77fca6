"""Time to first token of a request that comes after a pause, as an interactive user's does.

    python bench/idle_ttft.py URL [URL ...] [--pauses 0,0.1,0.3] [--rounds 25] [--words 100]

Each URL is an OpenAI-compatible server (a haifctl bridge, llama-server).  For each pause, each
round sends every server in turn one streaming completion (a prompt of its own, 4 tokens) after
sleeping that long, and times the first text.  Back to back (pause 0) the servers still idle
while the others answer.  Prints p50 and p90 per server and pause; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import httpx

from haifctl.loadgen import prompt_text


def first_text_ms(client: httpx.Client, url: str, prompt: str) -> float:
    body = {"model": "stories260K", "prompt": prompt, "max_tokens": 4, "stream": True}
    started = time.perf_counter()
    with client.stream("POST", url.rstrip("/") + "/v1/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choices = json.loads(line[6:]).get("choices") or [{}]
            if choices[0].get("text"):
                return (time.perf_counter() - started) * 1000
    raise RuntimeError(f"{url} streamed no text")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("urls", nargs="+")
    parser.add_argument("--pauses", default="0,0.1,0.3")
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--words", type=int, default=100)
    args = parser.parse_args()
    offset = 1_000_000
    print(f"{'pause s':>8}  {'TTFT p50':>9}  {'p90':>7}  server")
    with httpx.Client(timeout=60) as client:
        for pause in (float(p) for p in args.pauses.split(",")):
            times: dict[str, list[float]] = {url: [] for url in args.urls}
            for _ in range(args.rounds):
                for url in args.urls:
                    offset += 1
                    time.sleep(pause)
                    times[url].append(first_text_ms(client, url, prompt_text(args.words, offset)))
            for url, values in times.items():
                values.sort()
                p90 = values[max(0, int(len(values) * 0.9) - 1)]
                print(f"{pause:8.2f}  {statistics.median(values):7.1f}ms  {p90:5.1f}ms  {url}")


if __name__ == "__main__":
    main()
