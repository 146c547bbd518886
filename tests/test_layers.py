"""The package's folders are its layers and imports run one way (docs/architecture.md): the math imports no other
layer and no Lightning; the training plumbing only the math; agents and data (domains) the two below them and not
each other; the tools anything below; the CLI everything. Lazy imports inside functions count too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import trqam_lit

PACKAGE = Path(trqam_lit.__file__).parent
MAY_IMPORT = {
    "math": {"math"},
    "training": {"math", "training"},
    "agents": {"math", "training", "agents"},
    "data": {"math", "training", "data"},
    "tools": {"math", "training", "agents", "data", "tools"},
    "cli": {"math", "training", "agents", "data", "tools", "cli"},
}
# Third-party packages a layer must not need: the math runs without Lightning; plotting is the tools' extra.
MUST_NOT_IMPORT = {"math": {"lightning", "matplotlib"}, "training": {"matplotlib"}, "agents": {"matplotlib"},
                   "data": {"matplotlib"}}  # fmt: skip


def layer_of(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth of the file, relative imports resolved."""
    package = ".".join(("trqam_lit", *path.relative_to(PACKAGE).parent.parts))
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)  # `from trqam_lit import math` names a layer too
    return out


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_run_one_way_between_layers(path):
    layer = layer_of(path)
    assert layer in MAY_IMPORT, f"{path.relative_to(PACKAGE)} is in no layer: add it to a layer's folder"
    wrong = set()
    for name in imports_of(path):
        parts = name.split(".")
        if parts[0] == "trqam_lit" and len(parts) > 1 and parts[1] in MAY_IMPORT and parts[1] not in MAY_IMPORT[layer]:
            wrong.add(name)
        if parts[0] in MUST_NOT_IMPORT.get(layer, ()):
            wrong.add(name)
    assert not wrong, f"{path.relative_to(PACKAGE)} ({layer}) imports {sorted(wrong)}"


def test_the_layer_check_sees_a_wrong_way_import(tmp_path, monkeypatch):
    # The check itself: a math module importing an agent, or Lightning, is caught (relative and lazy forms).
    fake = PACKAGE / "math" / "flow.py"
    source = "def f():\n    from ..agents import TRQAM\n    import lightning.pytorch as pl\n"
    monkeypatch.setattr(Path, "read_text", lambda self: source if self == fake else Path.read_bytes(self).decode())
    assert {"trqam_lit.agents", "lightning.pytorch"} <= imports_of(fake)
    with pytest.raises(AssertionError, match="imports"):
        test_imports_run_one_way_between_layers(fake)
