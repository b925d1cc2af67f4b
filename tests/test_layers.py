"""The architecture holds: who may import whom, and how big a module or a function may grow.

    core/      imports nothing of the project (stdlib; pydantic in core/config.py only)
    daemon/    core/ only (it starts the worker as `python -m trainer.worker`, by name)
    trainer/   core/ only
    monitor/   core/ and daemon/ (it never imports torch or the trainer)
    ops/       anything: the operations that need both (trainer-ctl, consolidation, check)

Every import is counted, also the ones inside functions.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT = ("core", "daemon", "trainer", "monitor", "ops")
ALLOWED = {
    "core": {"core"},
    "daemon": {"core", "daemon"},
    "trainer": {"core", "trainer"},
    "monitor": {"core", "daemon", "monitor"},
    "ops": set(PROJECT),
}
# third-party packages a layer may not use: the daemon and the monitor stay free of the ML stack
FORBIDDEN_THIRD_PARTY = {
    "daemon": {"torch", "transformers", "peft", "bitsandbytes", "accelerate", "safetensors", "numpy"},
    "monitor": {"torch", "transformers", "peft", "bitsandbytes", "accelerate", "safetensors"},
}
CORE_THIRD_PARTY = {"config.py": {"pydantic"}}
MAX_MODULE_LINES = 420
MAX_FUNCTION_LINES = 80


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).glob("*.py"))


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in *path*, relative ones resolved."""
    out = []
    pkg = path.parent.name
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                out.append((node.lineno, f"{pkg}.{node.module}" if node.module else pkg))
            else:
                out.append((node.lineno, node.module or ""))
                if node.module in PROJECT:        # `from daemon import control` imports daemon.control
                    out += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return out


def _violations(package: str) -> list[str]:
    bad = []
    for path in _modules(package):
        for line, mod in _imports(path):
            top = mod.split(".")[0]
            where = f"{package}/{path.name}:{line} imports {mod}"
            if top in PROJECT and top not in ALLOWED[package]:
                bad.append(where)
            elif top in FORBIDDEN_THIRD_PARTY.get(package, ()):
                bad.append(where + " (the ML stack belongs to the trainer)")
            elif package == "core" and top not in PROJECT and top not in sys.stdlib_module_names \
                    and top not in CORE_THIRD_PARTY.get(path.name, ()) and top != "__future__":
                bad.append(where + " (core/ is stdlib-only)")
    return bad


@pytest.mark.parametrize("package", PROJECT)
def test_imports_point_down(package: str) -> None:
    assert _modules(package), f"no modules in {package}/"
    assert _violations(package) == []


def test_the_rule_catches_a_sideways_import(tmp_path: Path) -> None:
    """The walker sees imports inside functions and `from pkg import module` forms."""
    fake = tmp_path / "trainer" / "x.py"
    fake.parent.mkdir()
    fake.write_text("def f():\n    from daemon import control\n    import ops.ctl\n", encoding="utf-8")
    mods = [m for _, m in _imports(fake)]
    assert "daemon.control" in mods and "ops.ctl" in mods


def test_runtime_queue_folder_does_not_shadow_stdlib() -> None:
    assert not (ROOT / "queue" / "__init__.py").exists()
    assert not any((ROOT / p / "queue.py").exists() for p in PROJECT)


@pytest.mark.parametrize("package", PROJECT)
def test_modules_and_functions_stay_small(package: str) -> None:
    too_big = []
    for path in _modules(package):
        text = path.read_text(encoding="utf-8")
        lines = len(text.splitlines())
        if lines > MAX_MODULE_LINES:
            too_big.append(f"{package}/{path.name}: {lines} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    too_big.append(f"{package}/{path.name}:{node.lineno} {node.name}: {n} lines")
    assert too_big == []
