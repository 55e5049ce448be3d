"""Nova's own CPU kernels (C++, ``nova/runtime/csrc``), built on first use for this machine.

``decode_attention`` reads a decode step's keys and values in place from the paged KV cache
(``csrc/cpu_decode_attention.cpp`` says why), and ``prefill_attention`` a prompt batch's, in
bf16 on AMX tiles where the CPU has them (``csrc/cpu_prefill_attention.cpp``; built with
``-march=native``, so only a CPU with AMX compiles that path; ``prefill_attention_amx`` says
whether it runs here); ``rms_norm``, ``add_rms_norm``, ``silu_mul`` and
``rope`` do the decoder's elementwise work in one pass each (``csrc/cpu_elementwise.cpp``; the
decoder calls them through ``nova.runtime.cpu_fused``). The sources are compiled with
``torch.utils.cpp_extension`` (gcc and ninja) for the CPU it runs on (``-march=native``) into
``$NOVA_CACHE_DIR/cpu_kernels/<key>`` (``~/.cache/nova`` without it), keyed by the source, the
flags, torch's version and the CPU's model and flags, so a second process loads the built
library in well under a second.

``NOVA_CPU_KERNELS=0`` turns the kernels off (the eager path runs). A build that fails is
logged once with the compiler's message and the eager path runs; ``NOVA_CPU_KERNELS=require``
makes that failure an error instead (the tests use it, so a broken build cannot pass as a
fallback).
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import threading
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
SOURCES = (
    CSRC / "module.cpp",
    CSRC / "cpu_decode_attention.cpp",
    CSRC / "cpu_elementwise.cpp",
    CSRC / "cpu_sampling.cpp",
    CSRC / "cpu_kv_write.cpp",
    CSRC / "cpu_prefill_attention.cpp",
)
HEADERS = (CSRC / "cpu_math.h",)
CFLAGS = ("-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp", "-fno-math-errno")
_lock = threading.Lock()
_state: dict[str, ModuleType | None] = {}


def _cpu_identity() -> str:
    """The CPU's model name and feature flags (what ``-march=native`` compiles for)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))]
    return "\n".join(dict.fromkeys(keep))


def build_key() -> str:
    import torch

    h = hashlib.sha256()
    for path in SOURCES + HEADERS:
        h.update(path.read_bytes())
    for part in (" ".join(CFLAGS).encode(), torch.__version__.encode()):
        h.update(part)
    h.update(_cpu_identity().encode())
    return h.hexdigest()[:16]


def _ninja_on_path() -> None:
    """``torch.utils.cpp_extension`` runs ``ninja`` from ``PATH``; the ``ninja`` package
    installed with Nova puts it in the venv's ``bin``, which is on ``PATH`` only when the venv
    is activated (``.venv/bin/python -m pytest`` does not activate it)."""
    if shutil.which("ninja") is not None:
        return
    try:
        import ninja
    except ImportError:
        return
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def mode() -> str:
    """``off``, ``on`` (fall back to eager when the build fails) or ``require``."""
    value = os.environ.get("NOVA_CPU_KERNELS", "1").strip().lower()
    if value in ("0", "off", "false", "no"):
        return "off"
    return "require" if value == "require" else "on"


def load() -> ModuleType | None:
    """The compiled kernels, or None (turned off, or the build failed and fallback is on)."""
    m = mode()
    if m == "off":
        return None
    if "module" in _state:  # (the decoder asks several times per layer: no lock once built)
        return _state["module"]
    with _lock:
        if "module" in _state:
            return _state["module"]
        key = build_key()
        cache = os.environ.get("NOVA_CACHE_DIR") or Path.home() / ".cache" / "nova"
        build_dir = Path(cache) / "cpu_kernels" / key
        try:
            from torch.utils.cpp_extension import load as load_extension

            _ninja_on_path()
            build_dir.mkdir(parents=True, exist_ok=True)
            module = load_extension(
                name=f"nova_cpu_kernels_{key}",
                sources=[str(p) for p in SOURCES],
                extra_cflags=list(CFLAGS),
                extra_ldflags=["-fopenmp"],
                build_directory=str(build_dir),
                verbose=False,
            )
        except Exception as exc:  # (a compiler error is a RuntimeError with its output)
            if m == "require":
                raise RuntimeError(f"building Nova's CPU kernels failed: {exc}") from exc
            log.warning("Nova's CPU kernels did not build; the eager path runs: %s", exc)
            module = None
        _state["module"] = module
        return module
