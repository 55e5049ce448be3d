"""``nova profile``: measure (or merge) a cost profile and write it as JSON.

The parser imports no torch (its engine flags come from ``EngineConfig``); running a
measurement does.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from nova.config import EngineConfig
from nova.flags import add_flags
from nova.profiling.grid import STATISTICS
from nova.profiling.summary import summarize

# EngineConfig fields ``nova profile`` takes. --partition defaults to none given: share 1.0
# measured without SM partitions (a backend is needed for --shares below 1).
ENGINE_FLAGS = ("model", "device", "dtype", "load_format", "partition")
ENGINE_FLAG_DEFAULTS = {"partition": None}


def _share_args(args: argparse.Namespace) -> dict[str, Any]:
    """``--partition`` / ``--shares``: SM shares measured through a partition backend
    (nova.gpu.partition; green contexts on a GPU that has them)."""
    shares = tuple(float(x) for x in args.shares.split(",")) if args.shares else (1.0,)
    if args.partition is None:
        return {"shares": shares}
    from nova.gpu.partition import backend_share_context

    return {"shares": shares, "share_context": backend_share_context(args.partition, args.device)}


def run_profile(args: argparse.Namespace) -> int:
    """Measure (or, with ``--merge``, merge) a profile; validate it, write it, summarise it."""
    from nova.cost.profiled import ProfiledCostModel, merge_profiles

    if args.merge:
        profile = merge_profiles(
            [json.loads(Path(f).read_text()) for f in args.merge],
            table_statistic=args.statistic or "min",
        )
    else:
        from nova.config import AUTO_DTYPE, torch_dtype
        from nova.profiling.profile import profile_model

        # (auto: the checkpoint's, as the engine's; the engine plans with a profile of its own
        # dtype only: nova.cost.profiled.shipped_profile_for)
        dtype = None if args.dtype == AUTO_DTYPE else torch_dtype(args.dtype)
        profile = profile_model(
            args.model,
            args.device,
            dtype=dtype,
            quick=args.quick,
            warmup=args.warmup,
            repeats=args.repeats,
            load_format=args.load_format,
            num_threads=args.threads,
            statistic=args.statistic or "median",
            passes=args.passes,
            through=args.through,
            **_share_args(args),
        )
    meta = profile["metadata"]
    out = Path(args.out) if args.out else default_out(meta)
    model = ProfiledCostModel.from_dict(profile)  # validates what we are about to write
    model.save(out)
    print(summarize(profile))
    print(f"wrote {out}")
    return 0


def default_out(meta: dict[str, Any]) -> Path:
    """``<model>-<gpu>-<dtype>-<device slug>.json``: the file name ``shipped_profile_for``
    takes first on the device it was measured on (copied into ``nova/cost/profiles``)."""
    from nova.cost.profiled import device_slug

    model = Path(str(meta["model"])).name
    return Path(
        f"{model}-{meta['gpu']}-{meta['dtype']}-{device_slug(str(meta['device_name']))}.json"
    )


def add_profile_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``profile`` subcommand on an ``argparse`` subparsers object."""
    p = subparsers.add_parser(
        "profile", help="measure stage latency tables for the profiled cost model"
    )
    add_flags(p, EngineConfig, include=ENGINE_FLAGS, defaults=ENGINE_FLAG_DEFAULTS)
    p.add_argument(
        "--out",
        default=None,
        help="output JSON (default: ./<model>-<gpu>-<dtype>-<device>.json, the name the engine "
        "looks for among the shipped profiles on this device)",
    )
    p.add_argument("--quick", action="store_true", help="tiny grid, for smoke tests")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--passes", type=int, default=1, help="sweeps of the grid, samples pooled")
    p.add_argument(
        "--statistic",
        default=None,
        choices=sorted(STATISTICS),
        help="summary of the samples (default median; min resists noise from other "
        "processes); with --merge: of the merged tables (default min)",
    )
    p.add_argument(
        "--merge",
        nargs="+",
        default=None,
        metavar="PROFILE",
        help="measure nothing: merge these profile files (same model and grid)",
    )
    p.add_argument(
        "--through",
        default=None,
        choices=("executor", "runner"),
        help="time TorchExecutor.execute on mixed-shape batches on stage worker threads "
        "(default; what the engine runs) or the bare runner calls on uniform shapes "
        "(default with --partition)",
    )
    p.add_argument(
        "--shares",
        default=None,
        metavar="S1,S2,...",
        help="SM shares to measure, e.g. 0.25,0.5,1.0 (default 1.0); shares below 1 need "
        "--partition",
    )
    p.set_defaults(func=run_profile)
    return p
