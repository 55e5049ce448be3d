"""Measuring cost profiles with the real runtime (torch): the data ``nova.cost.profiled`` reads.

- ``profile`` -- ``profile_model``: one profile (stage latency tables over a grid, co-running
  factors, metadata); ``summary`` -- ``summarize``, a few lines for humans (torch-free);
- ``engine_batches`` / ``runner_batches`` -- the two timing harnesses: real ``Batch``es through
  ``TorchExecutor.execute`` (what the engine's stage workers run; the default), or bare
  ``ModelRunner`` calls (the path for SM shares);
- ``timing`` -- timing on a device, stage worker threads, co-running measurement;
- ``device`` -- what the device is (its name; its GPU spec via ``nova.cost.gpus``);
- ``grid`` -- the grid of batch shapes and the statistics (torch-free);
- ``cli`` -- ``nova profile`` (its parser imports no torch; running it does).

Profiles shipped with Nova live in ``nova/cost/profiles/`` (data of the torch-free cost package).
Importing ``nova.profiling`` itself imports nothing heavy; ``profile_model`` etc. load on use.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ProfileGrid", "profile_model", "summarize"]


def __getattr__(name: str) -> Any:
    if name == "ProfileGrid":
        from nova.profiling.grid import ProfileGrid

        return ProfileGrid
    if name == "profile_model":
        from nova.profiling.profile import profile_model

        return profile_model
    if name == "summarize":
        from nova.profiling.summary import summarize

        return summarize
    raise AttributeError(f"module 'nova.profiling' has no attribute {name!r}")
