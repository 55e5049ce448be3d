"""The ``nova`` command line imports a subcommand's modules only when it runs: ``nova eval`` and
``nova bench`` work where torch, FastAPI, uvicorn and transformers cannot be imported, and a
command that needs a missing extra says which one to install."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from nova.extras import EXTRAS, MissingExtraError, missing_modules, require_extra

ROOT = Path(__file__).resolve().parents[1]

# Runs ``nova`` with every import of the named top-level packages failing, as on a machine where
# they are not installed.
BLOCKED_RUNNER = """
import sys
BLOCKED = set(sys.argv[1].split(","))

class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked by the test (not installed)")
        return None

sys.meta_path.insert(0, Blocker())
from nova.cli import main
code = main(sys.argv[2:])
leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
assert not leaked, f"imported although blocked: {leaked}"
sys.exit(code)
"""

NO_TORCH_NO_SERVER = "torch,fastapi,uvicorn,transformers"


def run_blocked(blocked: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", BLOCKED_RUNNER, blocked, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )


def test_the_blocker_blocks():
    """A command that needs torch fails under the blocker (so the passes below mean something)."""
    res = run_blocked(NO_TORCH_NO_SERVER, "generate", "--prompt", "hi")
    assert res.returncode != 0
    assert "blocked by the test" in res.stderr


def test_help_without_torch_or_fastapi():
    res = run_blocked(NO_TORCH_NO_SERVER, "--help")
    assert res.returncode == 0, res.stderr
    for command in ("demo", "generate", "eval", "serve", "bench", "profile", "build-demo"):
        assert command in res.stdout
    for args in (["bench", "--help"], ["profile", "--help"], ["eval", "--list"]):
        res = run_blocked(NO_TORCH_NO_SERVER, *args)
        assert res.returncode == 0, (args, res.stderr)
    assert "--base-url" in run_blocked(NO_TORCH_NO_SERVER, "bench", "--help").stdout


def test_eval_runs_without_torch_or_fastapi(tmp_path):
    res = run_blocked(NO_TORCH_NO_SERVER, "eval", "quick-a6000", "--out", str(tmp_path))
    assert res.returncode == 0, res.stderr
    report = json.loads((tmp_path / "results.json").read_text())
    assert report and (tmp_path / "results.md").read_text() in res.stdout


def test_bench_runs_without_torch_or_fastapi():
    """It gets as far as the (absent) server: a clean error, no import failure."""
    res = run_blocked(
        NO_TORCH_NO_SERVER,
        "bench",
        "--base-url",
        "http://127.0.0.1:9",
        "--num-prompts",
        "1",
        "--disable-tqdm",
    )
    assert res.returncode == 2, res.stderr
    assert "talking to the server failed" in res.stderr
    assert "Traceback" not in res.stderr


def test_a_missing_extra_names_the_pip_extra():
    res = run_blocked("fastapi,uvicorn", "serve", "--model", "demo")
    assert res.returncode == 2
    assert "pip install 'nova-serve[server]'" in res.stderr and "fastapi" in res.stderr
    assert "Traceback" not in res.stderr
    res = run_blocked("httpx", "bench", "--help")
    assert res.returncode == 2 and "pip install 'nova-serve[bench]'" in res.stderr


def test_extras_match_pyproject():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    for extra, modules in EXTRAS.items():
        names = {re.split(r"[<>=\[]", req)[0].strip() for req in declared[extra]}
        assert names == set(modules), extra
    # every runtime dependency of the core is not an extra: no extra repeats a core dependency
    core = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    core_names = {req.split(">")[0].split("=")[0].split("<")[0].strip() for req in core}
    assert not core_names & {n for modules in EXTRAS.values() for n in modules}


def test_require_extra(monkeypatch):
    assert missing_modules("server") == []  # the test environment has every extra
    require_extra("bench", "nova bench")
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # as if not installed
    assert missing_modules("server") == ["prometheus_client"]
    with pytest.raises(MissingExtraError, match=r"pip install 'nova-serve\[server\]'"):
        require_extra("server", "nova serve")
    with pytest.raises(ValueError, match="unknown extra"):
        missing_modules("gui")


def test_external_subcommand_help_matches_the_modules_own():
    """``nova --help`` lists external subcommands from ``EXTERNAL`` without importing them; the
    text must be the one their own parser registers."""
    import argparse
    import importlib

    from nova.cli import EXTERNAL

    for name, ext in EXTERNAL.items():
        parser = argparse.ArgumentParser(prog="nova")
        sub = parser.add_subparsers()
        getattr(importlib.import_module(ext.module), ext.adder)(sub)
        [action] = [a for a in sub._choices_actions if a.dest == name]
        assert action.help == ext.help, name
