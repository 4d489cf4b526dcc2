"""DESIGN.md's dependency rules (imports point down only) and the light `import leanfm`."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import leanfm

ROOT = Path(leanfm.__file__).parent

# package -> leanfm packages it must not import (DESIGN.md, "Layout")
FORBIDDEN = {
    "utils": {"ops", "models", "checkpoint", "compress", "tune", "engine", "server", "bench", "cli"},
    "ops": {"models", "checkpoint", "compress", "tune", "engine", "server", "bench", "cli"},
    "models": {"checkpoint", "compress", "tune", "engine", "server", "bench", "cli"},
    "checkpoint": {"compress", "tune", "engine", "server", "bench", "cli"},
    "compress": {"engine", "server", "bench", "tune", "cli"},
    "tune": {"engine", "server", "bench", "compress", "cli"},
    "engine": {"compress", "tune", "server", "bench", "cli"},
    "server": {"models", "compress", "tune", "bench", "cli"},
}


def leanfm_imports(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "leanfm" and len(parts) > 1:
                yield node.lineno, parts[1]


def test_imports_point_down_only():
    violations = []
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        package = rel.parts[0] if len(rel.parts) > 1 else None
        for lineno, target in leanfm_imports(path):
            if package and target in FORBIDDEN.get(package, set()):
                violations.append(f"leanfm/{rel}:{lineno} ({package}) imports leanfm.{target}")
    assert not violations, "\n".join(violations)


@pytest.mark.parametrize("module", ["leanfm", "leanfm.models", "leanfm.engine.generate", "leanfm.checkpoint.loader",
                                    "leanfm.tune", "leanfm.tune.api", "leanfm.server", "leanfm.cli"])
def test_import_is_light(module):
    code = (
        f"import sys, {module}\n"
        "heavy = [m for m in ('transformers', 'fastapi', 'matplotlib', 'uvicorn') if m in sys.modules]\n"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"import {module} pulled in: {out.stdout.strip()}"
