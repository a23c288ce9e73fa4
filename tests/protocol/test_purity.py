"""``outbox.protocol`` stays pure: no module in it imports asyncio, sqlite3, aiosqlite or
websockets.asyncio, directly or through what it imports.

Two checks, because neither is enough alone:

- **The source** (``ast``): every ``import`` statement in every ``outbox/protocol/*.py``,
  wherever it stands (inside a function, a ``try``, ``if TYPE_CHECKING``), with relative
  imports resolved. This sees imports that a run does not execute, but not what the imported
  modules import in turn.
- **A fresh interpreter**, one per module, for what an import really loads, transitively
  (``outbox.errors``, websockets' own package ``__init__``, orjson). The catch: a plain
  ``import outbox.protocol.wire`` runs ``outbox/__init__.py`` first, which imports the whole
  library (the client, hence asyncio and aiosqlite), so ``sys.modules`` would say nothing
  about the protocol. The subprocess therefore puts an empty stand-in package named
  ``outbox``, whose ``__path__`` is the real package directory, into ``sys.modules`` before
  importing: ``outbox.protocol``, ``outbox.errors`` and every other submodule are then found
  and executed from the real files by the ordinary import system, and only the top-level
  ``__init__`` is skipped. Nothing of the protocol's own import graph is hidden (the parent's
  ``__init__`` is not part of it), and the stand-in is checked to still catch an I/O module.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import outbox.protocol

FORBIDDEN = ("asyncio", "sqlite3", "aiosqlite", "websockets.asyncio")
PACKAGE_DIR = Path(outbox.protocol.__file__).resolve().parent.parent  # .../outbox
PROTOCOL_FILES = sorted((PACKAGE_DIR / "protocol").glob("*.py"))


def module_name(path: Path) -> str:
    if path.name == "__init__.py":
        return "outbox.protocol"
    return f"outbox.protocol.{path.stem}"


def is_forbidden(name: str) -> bool:
    return any(name == bad or name.startswith(bad + ".") for bad in FORBIDDEN)


def imported_names(path: Path) -> set[str]:
    """Every module an import statement in ``path`` names, relative ones made absolute."""
    package = "outbox.protocol"  # for __init__.py and for the modules in it alike
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            names.add(module)
            # `from . import wire` or `from websockets import asyncio`: the names may be modules.
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def test_the_protocol_modules_are_all_found() -> None:
    stems = {path.stem for path in PROTOCOL_FILES}
    expected = {"codec", "wire", "window", "feed", "batching", "heartbeat", "backoff"}
    assert expected <= stems, f"missing from outbox/protocol: {sorted(expected - stems)}"


def test_the_import_resolver_sees_relative_and_nested_imports(tmp_path: Path) -> None:
    source = tmp_path / "example.py"
    source.write_text(
        "from . import wire\nfrom ..errors import ProtocolError\ndef later():\n    import asyncio\n"
    )
    names = imported_names(source)
    assert {"outbox.protocol.wire", "outbox.errors", "asyncio"} <= names
    assert [name for name in names if is_forbidden(name)] == ["asyncio"]


@pytest.mark.parametrize("path", PROTOCOL_FILES, ids=module_name)
def test_the_source_imports_no_io_module(path: Path) -> None:
    bad = sorted(name for name in imported_names(path) if is_forbidden(name))
    assert not bad, f"{path.name} imports {bad}: outbox.protocol must stay pure"


PROBE = """
import importlib, importlib.machinery, json, sys, types

root, name, forbidden = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
before = sorted(m for m in forbidden if m in sys.modules)
stand_in = types.ModuleType("outbox")  # the real outbox/__init__.py imports everything
stand_in.__path__ = [root]
stand_in.__spec__ = importlib.machinery.ModuleSpec("outbox", None, is_package=True)
stand_in.__spec__.submodule_search_locations = [root]
sys.modules["outbox"] = stand_in
importlib.import_module(name)
after = sorted(m for m in forbidden if m in sys.modules)
print(json.dumps({"before": before, "after": after, "file": sys.modules[name].__file__}))
"""


def loaded_by(name: str) -> dict[str, object]:
    """Import ``name`` in a fresh interpreter (see the module docstring) and report."""
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(PACKAGE_DIR), name, ",".join(FORBIDDEN)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    report: dict[str, object] = json.loads(done.stdout)
    assert report["before"] == [], f"the interpreter loaded {report['before']} at startup"
    assert Path(str(report["file"])).resolve().is_relative_to(PACKAGE_DIR)
    return report


@pytest.mark.parametrize("path", PROTOCOL_FILES, ids=module_name)
def test_importing_loads_no_io_module(path: Path) -> None:
    loaded = loaded_by(module_name(path))["after"]
    assert loaded == [], f"importing {module_name(path)} loads {loaded}"


def test_the_fresh_interpreter_check_catches_an_io_module() -> None:
    # The stand-in parent must not hide anything: the client's session does I/O.
    assert "asyncio" in loaded_by("outbox.client.session")["after"]  # type: ignore[operator]
