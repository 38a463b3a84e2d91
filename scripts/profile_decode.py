"""Where a greedy decoding step's time goes (issue 20): profile :func:`bench.decoding.decode` on the first 64
TruthfulQA generation prompts at batch 64 (50 new tokens, every row running all steps), and time the model's own
linear layers alone at 16-128 rows (weights read from memory as in a step, not a cache-hot product).

    python scripts/profile_decode.py --data-dir ../shared/data --output results/perf-decode-profile.md

Run it alone on the machine: the figures are times.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from bench.data.truthfulqa import load_truthfulqa
from bench.decoding import decode, shared_prefix
from bench.generation import gen_prompt
from bench.models import load_model
from bench.perf import _stamp
from bench.runs import environment, now_iso


def linear_rates(lm, rows: tuple[int, ...] = (16, 32, 64, 128)) -> list[str]:
    """Every linear layer of the model once on ``rows`` random inputs (best of 3): ms per pass and GFLOP/s."""
    lins = [m for m in lm.model.modules() if isinstance(m, torch.nn.Linear)]
    lines = ["| rows | one pass through every linear layer (ms) | GFLOP/s |", "|---|---|---|"]
    for m_rows in rows:
        xs = {m.in_features: torch.randn(m_rows, m.in_features) for m in lins}
        best = float("inf")
        with torch.no_grad():
            for _ in range(4):  # the first is a warm-up
                t = time.perf_counter()
                for m in lins:
                    m(xs[m.in_features])
                best = min(best, time.perf_counter() - t)
        flops = sum(2 * m_rows * m.in_features * m.out_features for m in lins)
        lines.append(f"| {m_rows} | {1000 * best:.0f} | {flops / best / 1e9:.0f} |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--output", default="results/perf-decode-profile.md")
    a = p.parse_args()
    qs, _ = load_truthfulqa(a.data_dir)
    lm = load_model(a.model, device="cpu")
    ids = lm.tokenizer([gen_prompt(q.question) for q in qs[: a.batch]])["input_ids"]
    prefix = shared_prefix(lm, ids)
    decode(lm, ids[:8], prefix, 5, batch_size=8)  # warm-up
    t = time.perf_counter()
    decode(lm, ids, prefix, 50, batch_size=a.batch)
    plain = time.perf_counter() - t
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        decode(lm, ids, prefix, 50, batch_size=a.batch)
        profiled = time.perf_counter() - t
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10)
    stamp = _stamp({"command": "python scripts/profile_decode.py " + " ".join(sys.argv[1:]),
                    "git": environment("cpu")["git"], "finished": now_iso()})
    text = [f"# Decoding profile: {a.model}, batch {a.batch}, 50 new tokens", "",
            f"{stamp[1:-1]}, torch {torch.__version__}, {torch.get_num_threads()} threads.", "",
            f"Decoding {a.batch} rows × 50 tokens (the shared prefix computed before): {plain:.1f} s "
            f"({a.batch * 50 / plain:.1f} tok/s); under the profiler {profiled:.1f} s.", "",
            "```", table.strip(), "```", "",
            "The model's linear layers alone (each weight read once per pass, as in a decoding step):", "",
            *linear_rates(lm), ""]
    Path(a.output).write_text("\n".join(text))
    print("\n".join(text))


if __name__ == "__main__":
    main()
