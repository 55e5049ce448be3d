"""Nova: a serving engine for vision-language models used by agents, on one GPU.

Kept import-light: ``import nova`` does not import torch, so the torch-free parts
(``nova.core``) stay usable and fast to import.
"""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "LLM": ("nova.llm", "LLM"),
    "AsyncEngine": ("nova.engine.async_engine", "AsyncEngine"),
    "SamplingParams": ("nova.sampling_params", "SamplingParams"),
    "EngineConfig": ("nova.config", "EngineConfig"),
}


def __getattr__(name: str):
    """``nova.LLM`` etc. import their (torch-using) modules only on first use."""
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'nova' has no attribute {name!r}")
