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

from nova.lazy import lazy_attributes

__all__ = ["ProfileGrid", "profile_model", "summarize"]

__getattr__ = lazy_attributes(
    "nova.profiling",
    {
        "ProfileGrid": "nova.profiling.grid",
        "profile_model": "nova.profiling.profile",
        "summarize": "nova.profiling.summary",
    },
)
