"""The plain device runtime never imports the fast path (`hierfedlora.fast` wraps it, not the other
way round), neither at import time nor lazily inside a function."""

import ast
import subprocess
import sys
from pathlib import Path

import hierfedlora.device

DEVICE = Path(hierfedlora.device.__file__).parent


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, anywhere in its text (`from a import b`: `a` and `a.b`)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.ImportFrom):  # relative: resolve against the device package
            base = "hierfedlora.device" if node.level == 1 else "hierfedlora"
            mod = f"{base}.{node.module}" if node.module else base
            out |= {mod} | {f"{mod}.{a.name}" for a in node.names}
    return out


def test_no_device_module_names_the_fast_package():
    files = sorted(DEVICE.glob("*.py"))
    assert {p.stem for p in files} >= {"model", "train", "executor"}  # really read
    for path in files:
        fast = {m for m in imported_modules(path) if m == "hierfedlora.fast" or m.startswith("hierfedlora.fast.")}
        assert not fast, (path.name, fast)


def test_importing_the_device_runtime_loads_nothing_of_the_fast_path():
    mods = ", ".join(f"hierfedlora.device.{p.stem}" for p in sorted(DEVICE.glob("*.py")) if p.stem != "__init__")
    code = (f"import sys, importlib\nfor m in '{mods}'.split(', '): importlib.import_module(m)\n"
            "print(sorted(m for m in sys.modules if m.startswith('hierfedlora.fast')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
