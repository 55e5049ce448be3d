"""Pool the rounds of ``engine_latency.py`` runs: each system's output tok/s and TPOT p50 per
round, their mean, and the ratio of means to a reference system (default ``sequential``); the
ratio within each round (the systems ran minutes apart, the rounds further apart); and the time
each round's device sat idle between batches (``engine_latency``'s ``idle_s``, or for runs made
before it was recorded, the span less the batches' summed times where no batches overlapped).

Runs of the same systems in different orders (e.g. ``engine_cpu.json`` with ``multi_stream``
first and ``engine_cpu_turns_order.json`` with ``sequential`` first) pooled, so that the run
order's drift (later runs in a round ran slower here) falls on every system.
Usage: .venv/bin/python benchmarks/engine_rounds.py RESULTS.json ... --out FILE.md
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def rounds(paths: list[Path]) -> dict[str, list[tuple[str, float, float]]]:
    """System -> (file:round, output tok/s, TPOT p50 ms) for every round in ``paths``."""
    out: dict[str, list[tuple[str, float, float]]] = {}
    for path in paths:
        systems = json.loads(path.read_text())["systems"]
        for key, m in systems.items():
            name, _, rnd = key.partition("#")
            out.setdefault(name, []).append(
                (f"{path.stem}#{rnd}", m["output_throughput_tps"], 1e3 * m["tpot"]["p50"])
            )
    return out


def idle_ms(paths: list[Path]) -> dict[str, list[float | None]]:
    """System -> the device's idle time between batches (ms) in each round; None where it
    cannot be told (batches overlapped in a run that did not record it)."""
    out: dict[str, list[float | None]] = {}
    for path in paths:
        for o in json.loads(path.read_text()).get("decode_overlap", []):
            idle = o.get("idle_s")
            if idle is None and not o["beside_front"]["steps"]:
                summed = o["alone"]["steps"] * o["alone"].get("mean_ms", 0.0) / 1e3
                summed += o["vision_batches"] * o["vision_mean_ms"] / 1e3
                summed += o["prefill_batches"] * o["prefill_mean_ms"] / 1e3
                idle = o["span_s"] - summed
            ok = idle is not None and idle >= 0
            out.setdefault(o["system"], []).append(1e3 * idle if ok else None)
    return out


def report(paths: list[Path], reference: str) -> str:
    rows = rounds(paths)
    idle = idle_ms(paths)
    ref = rows[reference]
    ref_tps = statistics.mean(r[1] for r in ref)
    ref_tpot = statistics.mean(r[2] for r in ref)
    lines = [
        f"# Engine rounds pooled: {', '.join(p.name for p in paths)}",
        "",
        "Written by `benchmarks/engine_rounds.py`. Per system: output tok/s and TPOT p50 (ms) in "
        f"every round, their means, and the means' ratio to `{reference}`'s.",
        "",
        "| system | rounds | out tok/s per round | mean | x ref | TPOT p50 ms per round | mean "
        "| x ref | x ref within rounds: tok/s, TPOT (min-max) | idle ms per round |",
        "|---|---:|---|---:|---:|---|---:|---:|---|---|",
    ]
    by_round = {r[0]: r for r in ref}
    for name, rs in rows.items():
        tps = statistics.mean(r[1] for r in rs)
        tpot = statistics.mean(r[2] for r in rs)
        lines.append(
            f"| {name} | {len(rs)} | {', '.join(f'{r[1]:.1f}' for r in rs)} | {tps:.1f} | "
            f"{tps / ref_tps:.3f} | {', '.join(f'{r[2]:.0f}' for r in rs)} | {tpot:.1f} | "
            f"{tpot / ref_tpot:.3f} | {paired(rs, by_round)} | "
            f"{', '.join('-' if x is None else f'{x:.0f}' for x in idle.get(name, []))} |"
        )
    return "\n".join(lines) + "\n"


def paired(rs: list[tuple[str, float, float]], ref: dict[str, tuple[str, float, float]]) -> str:
    """The system's tok/s and TPOT p50 over the reference's in the same round: mean (min-max)."""
    pairs = [(r[1] / ref[r[0]][1], r[2] / ref[r[0]][2]) for r in rs if r[0] in ref]
    if not pairs:
        return "-"
    cells = []
    for i in (0, 1):
        xs = [p[i] for p in pairs]
        cells.append(f"{statistics.mean(xs):.3f} ({min(xs):.3f}-{max(xs):.3f})")
    return ", ".join(cells)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("results", type=Path, nargs="+")
    ap.add_argument("--reference", default="engine:sequential")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    text = report(args.results, args.reference)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
