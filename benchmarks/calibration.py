"""The roofline cost model per GPU: its calibration and evidence (every number with its source),
the CogAgent-9B paper shapes on every GPU, bandwidth vs SMs, and the A6000 trade-off figures.
No measurement: the evidence files' numbers and the model's predictions.
Writes benchmarks/results/calibration.{json,md}.

``--refit``: refit the fitted numbers and write them back into their evidence files --
the A6000's to the Nova paper's stage times (``calibrate_to_paper``), the cpu's to the shipped
CPU profile (``nova/cost/profiles/demo-cpu.json``; run it after refreshing that profile).
``--from-profile PATH``: a ``nova profile`` run with several SM shares becomes the GPU's measured
bandwidth curve (``nova/cost/data/measured/<gpu>-profile-<name>.json``).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from nova.cost.base import StageWork, make_cost_model
from nova.cost.evidence import DATA_DIR, load_evidence
from nova.cost.gpus import get_gpu
from nova.cost.model_spec import ModelSpec
from nova.cost.roofline import (
    PAPER_STAGE_TIMES_S,
    Calibration,
    RooflineCostModel,
    calibrate_to_paper,
    calibrate_to_profile,
    paper_works,
    profile_works,
)
from nova.types import Stage

GPUS = ("a6000", "rtx4090", "a100-80g", "h100-sxm", "h200", "cpu")
FITTED = {"vision_mfu": "vision_efficiency", "prefill_mfu": "prefill_efficiency"}
FITTED_BW = ("bw_eff", "decode_bandwidth_fraction")


def refit() -> None:
    """Rewrite the fitted values of gpus/a6000.json (paper) and gpus/cpu.json (CPU profile)."""
    fits: dict[str, Calibration] = {"a6000": calibrate_to_paper()}
    profile = make_cost_model("profiled", "cpu", "demo")
    spec = ModelSpec.named("demo")
    works = profile_works(getattr(profile, "metadata", {}), spec)
    times = {s: profile.time_s(w, 1.0) for s, w in works.items()}
    fits["cpu"] = calibrate_to_profile(times, works, "cpu", spec, Calibration.for_gpu("cpu"))
    for gpu, calib in fits.items():
        path = DATA_DIR / "gpus" / f"{gpu}.json"
        doc = json.loads(path.read_text())
        for field, key in (*FITTED.items(), FITTED_BW):
            doc["values"][key]["value"] = round(getattr(calib, field), 4)
        path.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"refit {path.relative_to(DATA_DIR.parent.parent.parent)}: {calib}")


def from_profile(path: Path) -> None:
    from nova.cost.profile_evidence import evidence_from_profile, profile_evidence_path
    from nova.cost.profiled import ProfiledCostModel

    profile = ProfiledCostModel.from_file(path)
    overhead = Calibration.for_gpu(profile.gpu()).decode_overhead_s
    doc = evidence_from_profile(profile, overhead, name=path.name)
    out = profile_evidence_path(DATA_DIR, profile.gpu().name, path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {out}: {len(doc['hbm_vs_sms']['points'])} points")


def gpu_rows(works: dict[Stage, StageWork]) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    for gpu in GPUS:
        ev = load_evidence(gpu)
        g = get_gpu(gpu)
        row: dict[str, Any] = {
            "calibration": Calibration.from_evidence(ev).to_dict(),
            "evidence": {k: v.to_dict() for k, v in sorted(ev.values.items())},
            "borrowed": ev.borrowed(),
            "assumptions": ev.assumptions(),
            "files": list(ev.files),
        }
        if gpu != "cpu":
            cost = RooflineCostModel(gpu, "cogagent-9b")
            row["paper_shapes_s"] = {s.value: cost.time_s(w, 1.0) for s, w in works.items()}
            row["bound"] = {s.value: cost.breakdown(w, 1.0).bound for s, w in works.items()}
            points = sorted({g.grid.min_sms, *range(8, g.num_sms + 1, 8), g.num_sms})
            row["bandwidth_vs_sms"] = {n: round(cost.bandwidth_fraction(n), 3) for n in points}
            row["sms_for_90pct_bandwidth"] = math.ceil(ev.hbm_vs_sms.sms_for(0.9, g.num_sms))
            decode_b = {b: cost.breakdown(StageWork.decode([1800] * b), 1.0) for b in (1, 64, 256)}
            row["decode_bound_by_batch"] = {b: d.bound for b, d in decode_b.items()}
        rows[gpu] = row
    return rows


def a6000_tradeoff() -> dict[str, float]:
    """What decides chunked prefill vs Nova on the A6000: a 128-token chunk carrying 4 decode
    tokens (full GPU), and decode steps on the paper's decode slices beside prefill."""
    a6000 = make_cost_model("roofline", "a6000", "cogagent-9b")
    chunk = StageWork(
        Stage.PREFILL, new_tokens=(128, 1, 1, 1, 1), context_lens=(1000, 1800, 1800, 1800, 1800)
    )
    decode4, prefill = StageWork.decode([1800] * 4), StageWork.prefill(1750)
    out = {
        "chunk128_plus_4_decode_s": a6000.time_s(chunk, 1.0),
        "decode4_full_gpu_s": a6000.time_s(decode4, 1.0),
        "prefill_full_gpu_s": a6000.time_s(prefill, 1.0),
    }
    for decode_sms in (12, 24, 30):
        rest = (84 - decode_sms) / 84
        out[f"decode4_on_{decode_sms}_sms_beside_prefill_s"] = a6000.time_s(
            decode4, decode_sms / 84, [(prefill, rest)]
        )
        out[f"prefill_on_{84 - decode_sms}_sms_beside_decode_s"] = a6000.time_s(
            prefill, rest, [(decode4, decode_sms / 84)]
        )
    return out


def markdown(rows: dict[str, Any], tradeoff: dict[str, float]) -> list[str]:
    lines = [
        "# Roofline cost model: calibration and evidence per GPU",
        "",
        "Every number comes from `nova/cost/data/` (common.json, gpus/<gpu>.json, measured/) and "
        "names its source there; `docs/scheduler.md` (Cost model) explains the model.",
        "",
        "## CogAgent-9B paper shapes, whole GPU, nothing co-running",
        "",
        "Paper (A6000, arXiv 2509.21301 Tables I-II): vision 806.8 ms (one 1120x1120 image), "
        "prefill 324.1 ms, decode 28.9 ms/token. Prefill assumes 1600 image + 150 text tokens; "
        "decode batch 1 at context 1800 (our assumptions). Only the A6000 is fitted to them.",
        "",
        "| GPU | vision ms | prefill ms | decode ms/token | SMs for 90% bandwidth |",
        "|---|---:|---:|---:|---:|",
    ]
    for gpu, r in rows.items():
        if "paper_shapes_s" not in r:
            continue
        t = r["paper_shapes_s"]
        lines.append(
            f"| {gpu} | {1e3 * t['vision']:.1f} | {1e3 * t['prefill']:.1f} | "
            f"{1e3 * t['decode']:.1f} | {r['sms_for_90pct_bandwidth']} of "
            f"{get_gpu(gpu).num_sms} |"
        )
    lines += ["", "## Calibration per GPU", ""]
    names = (
        "vision_mfu",
        "prefill_mfu",
        "decode_mfu",
        "bw_eff",
        "vision_overhead_s",
        "decode_overhead_s",
    )
    lines += ["| GPU | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for gpu, r in rows.items():
        c = r["calibration"]
        lines.append(f"| {gpu} | " + " | ".join(f"{c[n]:.4g}" for n in names) + " |")
    lines += ["", "## Borrowed numbers (measured on another device) and assumptions", ""]
    for gpu, r in rows.items():
        borrowed = ", ".join(f"{k} ({v})" for k, v in sorted(r["borrowed"].items()))
        lines.append(f"- **{gpu}**: borrowed: {borrowed or 'none'}")
        lines.append(f"  assumptions: {', '.join(r['assumptions']) or 'none'}")
    lines += ["", "## Fraction of the achievable HBM bandwidth vs SMs (hbm_vs_sms)", ""]
    for gpu, r in rows.items():
        if "bandwidth_vs_sms" in r:
            pts = ", ".join(f"{n}: {f:.2f}" for n, f in r["bandwidth_vs_sms"].items())
            lines.append(f"- {gpu}: {pts}")
    lines += ["", "## Sources of every number", ""]
    for gpu, r in rows.items():
        lines.append(f"### {gpu} ({', '.join(r['files'])})")
        lines.append("")
        for key, v in r["evidence"].items():
            lines.append(
                f"- `{key}` = {v['value']:g} (measured on {v['measured_on']}): {v['source']}"
            )
        lines.append("")
    lines += ["## A6000 trade-off (seconds)", ""]
    lines += [f"- {k}: {v:.4f}" for k, v in tradeoff.items()]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--refit", action="store_true", help="rewrite the fitted evidence values")
    ap.add_argument("--from-profile", type=Path, help="a nova profile with several SM shares")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    if args.refit:
        refit()
        return
    if args.from_profile:
        from_profile(args.from_profile)
        return
    works = paper_works()
    rows = gpu_rows(works)
    tradeoff = a6000_tradeoff()
    paper = {stage.value: t for stage, t in PAPER_STAGE_TIMES_S.items()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "calibration.json").write_text(
        json.dumps({"paper_a6000_s": paper, "gpus": rows, "a6000_tradeoff_s": tradeoff}, indent=1)
        + "\n"
    )
    lines = markdown(rows, tradeoff)
    (args.out / "calibration.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
