"""Architecture rules that keep the layout honest (the import contracts in pyproject.toml cover
which packages may import which; these cover what import-linter cannot)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("nova", "benchmarks")


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def cross_module_private_imports() -> list[str]:
    found = []
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*.py")):
            module = _module_name(path)
            tree = ast.parse(path.read_text(), filename=str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom):
                    source = _resolve(node, module, path.name == "__init__.py")
                    if source == module:
                        continue
                    where = f"{path.relative_to(ROOT)}:{node.lineno}"
                    for part in source.split("."):
                        if _private(part):
                            found.append(f"{where}: private module {source}")
                    for alias in node.names:
                        if _private(alias.name):
                            found.append(f"{where}: {source}.{alias.name}")
                elif isinstance(node, ast.Import):
                    for alias in node.names:
                        if any(_private(p) for p in alias.name.split(".")):
                            found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {alias.name}")
    return found


def test_no_module_imports_another_modules_private_names():
    assert cross_module_private_imports() == []


def test_the_private_import_check_catches_a_violation(tmp_path, monkeypatch):
    # The check must see a violation when there is one: scan a tree that has one.
    pkg = tmp_path / "nova"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("_hidden = 1\n")
    (pkg / "b.py").write_text("from nova.a import _hidden\n")
    (tmp_path / "benchmarks").mkdir()
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    assert cross_module_private_imports() == ["nova/b.py:1: nova.a._hidden"]


ISSUE_REFERENCE = re.compile(r"\bissues? #?\d", re.IGNORECASE)


def test_no_issue_numbers_in_code():
    hits = []
    for path in sorted((ROOT / "nova").rglob("*.py")):
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if ISSUE_REFERENCE.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert hits == []


def test_the_issue_number_check_catches_one():
    assert ISSUE_REFERENCE.search("# GPU mechanisms (issue 5)")
    assert ISSUE_REFERENCE.search("see issues 4 and 5")
    assert not ISSUE_REFERENCE.search("an issue with the tissue")
