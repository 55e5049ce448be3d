"""Seeded, reproducible workloads for benchmarks and the simulator. Torch- and numpy-free.

``make_workload(name, **kwargs)`` builds a registered workload:

* ``poisson``, ``bursty``: open-loop GUI-agent requests (AndroidLab-style phone tasks, one
  screenshot each, 30-80 output tokens) with exponential / gamma inter-arrival times;
* ``gui_sessions``: closed-loop multi-step agent sessions with think times;
* ``agent_sessions``: closed-loop UI-TARS-style sessions that resend the system prompt, the
  history and a sliding window of the last screenshots every step (what the prefix and
  encoder caches are for);
* ``azure_lmm``, ``mooncake``, ``burstgpt``: trace replay (sample traces in
  :data:`SAMPLE_TRACES`).

The same name, parameters and seed always give the same :class:`Workload`.
"""

from __future__ import annotations

from nova.workload.agent_sessions import agent_sessions
from nova.workload.arrivals import bursty, poisson
from nova.workload.gui_agent import (
    GUI_INSTRUCTIONS,
    GUI_TASKS,
    GuiContentConfig,
    GuiTask,
    gui_agent_request,
    text_tokens_estimate,
)
from nova.workload.registry import WORKLOADS, make_workload, register_workload, workload_parameters
from nova.workload.sessions import gui_sessions
from nova.workload.traces import SAMPLE_TRACES, azure_lmm, burstgpt, mooncake, parse_timestamp_s
from nova.workload.types import ChatTurn, ImageSpec, Workload, WorkloadRequest

__all__ = [
    "GUI_INSTRUCTIONS",
    "GUI_TASKS",
    "SAMPLE_TRACES",
    "WORKLOADS",
    "ChatTurn",
    "GuiContentConfig",
    "GuiTask",
    "ImageSpec",
    "Workload",
    "WorkloadRequest",
    "agent_sessions",
    "azure_lmm",
    "burstgpt",
    "bursty",
    "gui_agent_request",
    "gui_sessions",
    "make_workload",
    "mooncake",
    "parse_timestamp_s",
    "poisson",
    "register_workload",
    "text_tokens_estimate",
    "workload_parameters",
]
