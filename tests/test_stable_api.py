"""The stable plugin API: each stable module says what it offers (``__all__``), and the built-in plugins, the
example plugin and the plugin guide import only that, so a third party who copies them inherits no unstable import."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
#: the import paths docs/architecture.md calls stable
STABLE = (
    "ddpmkit",
    "ddpmkit.interfaces",
    "ddpmkit.diffusion",
    "ddpmkit.errors",
    "ddpmkit.testing",
    "ddpmkit.runtime.dropout",
    "ddpmkit.runtime.limits",
)


def _imports(source: str) -> list[tuple[str, str]]:
    """(module, name) of each ``from ddpmkit... import name`` in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "ddpmkit":
            found += [(node.module, alias.name) for alias in node.names]
    return found


def _plugin_sources() -> list[tuple[str, str]]:
    """(where, code) of the built-in plugins, the example plugin and every Python block of the plugin guide."""
    files = [*sorted((REPO / "ddpmkit_plugins").glob("*.py")), *sorted((REPO / "docs" / "examples").rglob("*.py"))]
    sources = [(str(p.relative_to(REPO)), p.read_text()) for p in files]
    guide = (REPO / "docs" / "writing-plugins.md").read_text()
    sources += [
        (f"docs/writing-plugins.md block {i}", b) for i, b in enumerate(re.findall(r"```python\n(.*?)```", guide, re.S))
    ]
    return sources


@pytest.mark.parametrize("module", STABLE)
def test_every_stable_module_says_what_it_offers(module):
    mod = importlib.import_module(module)
    assert isinstance(getattr(mod, "__all__", None), list | tuple), f"{module} has no __all__"
    missing = [name for name in mod.__all__ if not hasattr(mod, name)]
    assert not missing, f"{module}.__all__ names what it lacks: {missing}"


def test_plugins_import_only_the_stable_api():
    offered = {m: set(importlib.import_module(m).__all__) for m in STABLE}
    offered["ddpmkit"] |= {"hookimpl", "Register"}
    wrong = []
    for where, code in _plugin_sources():
        try:
            imports = _imports(code)
        except SyntaxError:  # a fragment of a block, not a module
            continue
        for module, name in imports:
            if module not in offered:
                wrong.append(f"{where}: from {module} import {name} (not a stable module)")
            elif name not in offered[module]:
                wrong.append(f"{where}: from {module} import {name} (not in its __all__)")
    assert not wrong, "\n".join(wrong)


def test_what_the_guide_says_diffusion_offers_is_offered():
    guide = (REPO / "docs" / "writing-plugins.md").read_text()
    said = guide.split("The diffusion maths lives in `ddpmkit.diffusion`", 1)[1].split("\n\n", 1)[0]
    names = set(re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)`", said)) - {"ddpmkit"}
    import ddpmkit.diffusion

    assert names and names <= set(ddpmkit.diffusion.__all__), names - set(ddpmkit.diffusion.__all__)
