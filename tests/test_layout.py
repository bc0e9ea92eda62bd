"""The package's layout is its architecture: groups by job, arrows one way, no import cycles.

Every import counts, function-local and TYPE_CHECKING-only ones included: both are arrows of the design.
docs/architecture.md describes these groups; GROUPS is its machine-checked form.
"""

from __future__ import annotations

import ast
from pathlib import Path

import ddpmkit

PACKAGE = Path(ddpmkit.__file__).parent

#: The groups (name: the modules or subpackages of ddpmkit in it), lowest level first. A module may import
#: from its own group and from the levels below; groups on one level do not import each other.
LEVELS: list[dict[str, tuple[str, ...]]] = [
    {
        "plugin API": (
            "errors",
            "validation",
            "version",
            "hookspecs",
            "kinds",
            "diffusion",
            "interfaces",
            "guidance",
            "extras",
        )
    },
    {"runtime": ("runtime",)},
    {"registry": ("registry",)},
    {"run": ("run",)},
    {"sampling": ("sampling",)},
    {"training": ("training",)},
    {
        "evaluation": ("evaluation",),
        "benchmark": ("benchmark",),
        "serving": ("serving",),
        "conformance kit": ("testing",),
    },
    {"commands": ("commands",)},
    {"front door": ("__init__", "__main__")},
]
GROUPS = {group: members for level in LEVELS for group, members in level.items()}
RANK = {group: i for i, level in enumerate(LEVELS) for group in level}


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The ddpmkit modules ``name`` imports (a ``from pkg import sub`` of a submodule counts as that submodule)."""
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod for a in node.names]
        else:
            continue
        out.update(t for t in targets if t in modules and t != name)
    return out


def _group(module: str) -> str:
    parts = module.split(".")
    key = parts[1] if len(parts) > 1 else "__init__"
    if module == "ddpmkit.__main__":
        key = "__main__"
    for group, members in GROUPS.items():
        if key in members:
            return group
    raise AssertionError(f"{module} belongs to no group of tests/test_layout.py: add it (and to docs/architecture.md)")


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_every_module_belongs_to_a_group():
    for module in _modules():
        _group(module)


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt) :] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_arrows_point_down():
    upward = []
    for module, targets in _graph().items():
        here = _group(module)
        for target in targets:
            there = _group(target)
            if RANK[there] > RANK[here] or (there != here and RANK[there] == RANK[here]):
                upward.append(f"{module} ({here}) imports {target} ({there})")
    assert not upward, "imports that point up the layers:\n" + "\n".join(sorted(upward))


def test_the_checker_sees_the_arrows_it_must(tmp_path):
    """The scanner itself: function-local, TYPE_CHECKING and relative imports are all edges."""
    modules = {"ddpmkit.a": tmp_path / "a.py", "ddpmkit.b": tmp_path / "b.py", "ddpmkit.c": tmp_path / "c.py"}
    modules["ddpmkit.a"].write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ddpmkit.b import x\n"
        "def f():\n    from .c import y\n"
    )
    assert _imports("ddpmkit.a", modules["ddpmkit.a"], modules) == {"ddpmkit.b", "ddpmkit.c"}


def test_the_architecture_page_names_every_group():
    page = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    for group, members in GROUPS.items():
        assert f"| {group} |" in page, f"docs/architecture.md has no row for the group {group!r}"
        for member in members:
            shown = f"ddpmkit/{member}" if not member.startswith("__") else f"ddpmkit/{member}.py"
            assert shown in page or f"`{member}.py`" in page or f"{member}.py" in page, (group, member)
