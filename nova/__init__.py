"""Nova: a serving engine for vision-language models used by agents, on one GPU.

Kept import-light: ``import nova`` does not import torch, so the torch-free parts
(``nova.core``) stay usable and fast to import.
"""
from __future__ import annotations

__version__ = "0.1.0"
