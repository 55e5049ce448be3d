"""Cost models: a stage batch's latency from its shape and its share of the GPU's SMs.

Used by the discrete-event simulator (``nova.sim``) and the adaptive (Nova) policy. Torch-free;
profiles are measured with the real runtime by ``nova.profiling`` (``nova profile``).

- ``gpus``: ``GpuSpec`` and the ``GPUS`` registry (A6000, RTX 4090, A100, H100, H200, cpu).
- ``sm_grid``: exact SM accounting: ``SmGrid`` (``GpuSpec.grid``), ``split_sms`` -> ``GrantedSMs``
  (decode on an aligned group, the compute stages on the exact remainder).
- ``model_spec``: ``ModelSpec`` (shape, params, FLOPs and bytes per stage) from a HF
  ``config.json`` or a shipped spec (``specs/cogagent-9b.json``, ``specs/demo.json``).
- ``base``: ``StageWork``, the ``CostModel`` protocol, ``make_cost_model`` (registry).
- ``evidence``: the roofline's per-GPU numbers from ``data/`` (every number names its source;
  ``load_evidence``, ``GpuEvidence``, ``EvidenceError``).
- ``roofline``: ``RooflineCostModel`` (wave quantization, bandwidth vs SMs, interference) and
  ``Calibration`` per GPU (the A6000's fitted to the Nova paper).
- ``profiled``: ``ProfiledCostModel`` over measured tables (``profiles/*.json``).
"""

from __future__ import annotations

from nova.cost.base import (
    COST_MODELS,
    CostModel,
    StageWork,
    UnknownCostModelError,
    available_cost_models,
    make_cost_model,
    register_cost_model,
)
from nova.cost.evidence import EvidenceError, GpuEvidence, load_evidence
from nova.cost.gpus import GPUS, GpuSpec, UnknownGpuError, available_gpus, get_gpu
from nova.cost.model_spec import ModelSpec, UnknownModelError, available_model_specs, get_model_spec
from nova.cost.profiled import ProfiledCostModel, ProfileError, available_profiles
from nova.cost.roofline import (
    PAPER_STAGE_TIMES_S,
    Calibration,
    RooflineCostModel,
    calibrate_to_paper,
    paper_works,
)
from nova.cost.sm_grid import GrantedSMs, SmGrid, split_sms

__all__ = [
    "COST_MODELS",
    "GPUS",
    "PAPER_STAGE_TIMES_S",
    "Calibration",
    "CostModel",
    "EvidenceError",
    "GpuEvidence",
    "GpuSpec",
    "GrantedSMs",
    "ModelSpec",
    "ProfileError",
    "ProfiledCostModel",
    "RooflineCostModel",
    "SmGrid",
    "StageWork",
    "UnknownCostModelError",
    "UnknownGpuError",
    "UnknownModelError",
    "available_cost_models",
    "available_gpus",
    "available_model_specs",
    "available_profiles",
    "calibrate_to_paper",
    "get_gpu",
    "get_model_spec",
    "load_evidence",
    "make_cost_model",
    "paper_works",
    "register_cost_model",
    "split_sms",
]
