"""Packages that export names lazily (``nova.lazy``): every listed name resolves to the object of
its module, an unlisted name is an AttributeError, and importing the packages imports no torch."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

LAZY_PACKAGES = {
    "nova": {"LLM", "AsyncEngine", "SamplingParams", "EngineConfig"},
    "nova.server": {"create_app", "ServerConfig", "add_serve_parser"},
    "nova.profiling": {"ProfileGrid", "profile_model", "summarize"},
    "nova.bench": {"BenchConfig", "add_bench_parser", "run_workload"},
}


@pytest.mark.parametrize("package", sorted(LAZY_PACKAGES))
def test_lazy_names_resolve(package):
    pkg = importlib.import_module(package)
    for name in LAZY_PACKAGES[package]:
        obj = getattr(pkg, name)
        assert obj.__name__ == name, (package, name)
        assert obj.__module__.startswith(package), (package, name, obj.__module__)
    with pytest.raises(AttributeError, match=f"module '{package}' has no attribute 'nope'"):
        pkg.nope  # noqa: B018 - the attribute access is what is tested


def test_importing_the_packages_imports_no_torch():
    code = (
        "import sys\n"
        f"for p in {sorted(LAZY_PACKAGES)!r}:\n"
        "    __import__(p)\n"
        "bad = [m for m in ('torch', 'fastapi', 'transformers') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
