"""Nova: a serving engine for vision-language models used by agents, on one GPU.

Kept import-light: ``import nova`` does not import torch, so the torch-free parts
(``nova.core``) stay usable and fast to import.
"""

from __future__ import annotations

from nova.lazy import lazy_attributes

__version__ = "0.1.0"

# ``nova.LLM`` etc. import their (torch-using) modules only on first use.
__getattr__ = lazy_attributes(
    "nova",
    {
        "LLM": "nova.llm",
        "AsyncEngine": "nova.engine.async_engine",
        "SamplingParams": "nova.sampling_params",
        "EngineConfig": "nova.config",
    },
)
