"""A ``nova profile`` run as roofline evidence: its decode table's SM shares as the GPU's
bandwidth-vs-SMs curve (torch-free).

A profile measured with several SM shares (``nova profile --partition green_context --shares
...``) times decode at each share. For a decode batch that is memory-bound, the memory time at
``k`` SMs relative to the whole GPU, ``(t(N) - overhead) / (t(k) - overhead)``, is the fraction
of the bandwidth ``k`` SMs reach: the roofline's ``hbm_vs_sms``. ``evidence_from_profile``
returns that curve as an evidence document (``nova.cost.evidence`` format, every point sourced
"our profile <file>, <device>, <date>"); saved under ``nova/cost/data/measured/`` it replaces the
shipped curve for that GPU (``benchmarks/calibration.py --from-profile PATH`` does that).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nova.cost.evidence import EVIDENCE_FORMAT, EVIDENCE_VERSION, EvidenceError, parse_evidence
from nova.cost.profiled import ProfiledCostModel, interpolate
from nova.types import Stage


def evidence_from_profile(
    profile: ProfiledCostModel, overhead_s: float, name: str | None = None
) -> dict[str, Any]:
    """The bandwidth curve of ``profile``'s decode table (largest batch, largest context of
    its grid) as an evidence document; ``overhead_s``: the decode step's fixed time (the GPU's
    ``decode_overhead_s``). Raises ``EvidenceError`` when the table has fewer than two shares."""
    table = profile.raw_tables.get(Stage.DECODE)
    if table is None or len(table.shares) < 2:
        raise EvidenceError(
            "the profile's decode table needs at least two SM shares to give a bandwidth curve "
            "(measure it with --partition green_context --shares ...)"
        )
    gpu = profile.gpu()
    meta = profile.metadata
    label = name or profile.source or "a nova profile"
    source = (
        f"our profile {label} ({meta.get('device_name', gpu.name)}, {meta.get('date', '?')}, "
        f"model {meta.get('model', '?')}): decode at batch {table.grid[0][-1]:g}, context "
        f"{table.grid[1][-1]:g}, memory time at the share vs the whole GPU"
    )
    point = (table.grid[0][-1], table.grid[1][-1])
    times = [interpolate(t, table.grid, point) for t in table.latency_s]
    if table.shares[-1] < 1.0:
        raise EvidenceError("the profile's decode table has no whole-GPU share (1.0)")
    full = times[-1] - overhead_s
    by_sms: dict[int, dict[str, Any]] = {}  # shares granted the same SMs: the last wins
    last = 0.0
    for share, t in zip(table.shares, times):
        frac = min(1.0, max(last, full / max(t - overhead_s, 1e-12)))
        last = frac
        by_sms[gpu.granted_sms(share)] = {
            "sms": gpu.granted_sms(share),
            "fraction": round(frac, 4),
            "source": f"{source} ({t * 1e3:.3f} ms at share {share:g})",
            "measured_on": gpu.name,
        }
    points = [by_sms[k] for k in sorted(by_sms)]
    doc: dict[str, Any] = {
        "format": EVIDENCE_FORMAT,
        "version": EVIDENCE_VERSION,
        "gpu": gpu.name,
        "description": f"Bandwidth vs SMs from {label}.",
        "hbm_vs_sms": {"note": "from a nova profile's decode table", "points": points},
    }
    parse_evidence(doc, label)
    return doc


def profile_evidence_path(data_dir: Path, gpu: str, profile_path: Path) -> Path:
    return data_dir / "measured" / f"{gpu}-profile-{profile_path.stem}.json"
