"""Hold `haifctl bench` against llama.cpp's own benchmarks of the same model (bench/gpu.sh).

    python bench/gpu_report.py --haifctl H.json --llama-bench LB.json --batched BB.jsonl
                               [--json-out SUMMARY.json]

Two comparisons per concurrency level:

- generation: tokens/s while only generating.  haifctl's side is one stream's decode rate
  (1000 / time per output token, p50) times the level, since every stream decodes at once;
  llama.cpp's is llama-bench tg (one sequence) or llama-batched-bench's S_TG (B sequences).
- end to end: output tokens over the whole time, prompt processing included.  haifctl's side is
  `haifctl bench`'s output tokens/s (HTTP, queueing and scheduling included); llama.cpp's is
  llama-batched-bench's B x TG / T, which processes every prompt and then generates.

A ratio of 1 means haifctl matches the engine it runs on.  Missing or failed inputs print "-".
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        print(f"note: {path}: {exc}", file=sys.stderr)
        return None


def load_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        print(f"note: {path}: {exc}", file=sys.stderr)
        return []
    for line in lines:
        line = line.strip()
        if line.startswith("{"):
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return rows


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def compare(haifctl: Any, llama_bench: Any, batched: list[dict[str, Any]]) -> dict[str, Any]:
    levels: dict[int, dict[str, Any]] = {}
    if isinstance(haifctl, dict) and isinstance(haifctl.get("levels"), list):
        for level in haifctl["levels"]:
            levels[int(level["concurrency"])] = level["results"][0]
    tg_single = None
    if isinstance(llama_bench, list):
        for run in llama_bench:
            if run.get("n_prompt") == 0 and run.get("n_gen", 0) > 0:
                tg_single = float(run["avg_ts"])
    by_pl = {int(r["pl"]): r for r in batched if "pl" in r}
    rows = []
    for c in sorted(set(levels) | set(by_pl)):
        h = levels.get(c)
        b = by_pl.get(c)
        tpot = h["tpot_ms"]["p50"] if h else None
        h_gen = round(c * 1000 / tpot, 1) if tpot else None
        h_e2e = h["output_tokens_per_s"] if h and h.get("ok") else None
        ref_gen = tg_single if c == 1 and tg_single else (b["speed_tg"] if b else None)
        ref_e2e = round(b["pl"] * b["tg"] / b["t"], 1) if b and b.get("t") else None
        rows.append(
            {
                "concurrency": c,
                "haifctl_generation_tok_s": h_gen,
                "llamacpp_generation_tok_s": ref_gen,
                "generation_reference": "llama-bench tg" if c == 1 and tg_single else "S_TG",
                "generation_ratio": ratio(h_gen, ref_gen),
                "haifctl_end_to_end_tok_s": h_e2e,
                "llamacpp_end_to_end_tok_s": ref_e2e,
                "end_to_end_ratio": ratio(h_e2e, ref_e2e),
                "haifctl_errors": h["errors"] if h else None,
                "haifctl_prompt_tokens": h["prompt_tokens_mean"] if h else None,
                "haifctl_ttft_p50_ms": h["ttft_ms"]["p50"] if h else None,
            }
        )
    return {"llama_bench_tg_tok_s": tg_single, "levels": rows}


def render(summary: dict[str, Any]) -> str:
    def num(v: float | None, fmt: str = "{:,.0f}") -> str:
        return "-" if v is None else fmt.format(v)

    head = (
        f"{'CONC':>4}  {'GEN haifctl':>11}  {'GEN llama.cpp':>13}  {'RATIO':>5}  "
        f"{'E2E haifctl':>11}  {'E2E llama.cpp':>13}  {'RATIO':>5}  {'TTFT P50 ms':>11}  ERRORS"
    )
    lines = ["tokens/s; GEN: generation only, E2E: prompt processing included", head]
    for r in summary["levels"]:
        lines.append(
            f"{r['concurrency']:>4}  {num(r['haifctl_generation_tok_s']):>11}  "
            f"{num(r['llamacpp_generation_tok_s']):>13}  "
            f"{num(r['generation_ratio'], '{:.2f}'):>5}  "
            f"{num(r['haifctl_end_to_end_tok_s']):>11}  "
            f"{num(r['llamacpp_end_to_end_tok_s']):>13}  "
            f"{num(r['end_to_end_ratio'], '{:.2f}'):>5}  "
            f"{num(r['haifctl_ttft_p50_ms'], '{:,.1f}'):>11}  "
            f"{'-' if r['haifctl_errors'] is None else r['haifctl_errors']}"
        )
    lines.append("GEN llama.cpp at 1: llama-bench tg; above 1: llama-batched-bench S_TG")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--haifctl", type=Path, required=True)
    parser.add_argument("--llama-bench", type=Path, required=True)
    parser.add_argument("--batched", type=Path, required=True)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    haifctl = load_json(args.haifctl)
    if isinstance(haifctl, dict) and "error" in haifctl:
        print(f"note: haifctl bench failed: {haifctl['error']}", file=sys.stderr)
    summary = compare(haifctl, load_json(args.llama_bench), load_jsonl(args.batched))
    if args.json_out:
        args.json_out.write_text(json.dumps(summary, indent=2) + "\n")
    print(render(summary))


if __name__ == "__main__":
    main()
