"""The config reference (``docs/config.md``), generated from the config's pydantic models and the options models
of the built-in components, so that it cannot drift from what ``load_config`` accepts.

``python -m ddpmkit.run.reference > docs/config.md`` writes it; a test fails when the committed file is stale.
"""

from __future__ import annotations

import inspect
import json
from typing import Any

from pydantic import BaseModel

from ddpmkit.kinds import KINDS
from ddpmkit.run.config import RunConfig

HEADER = """# Config reference

A run is one TOML file: the tables below, each optional (a missing key takes its default). `ddpmkit validate
CONFIG` checks a file and says what the run will do; `--set KEY=VALUE` overrides any key on the command line;
`ddpmkit describe NAME` shows the options of any installed component, a third party's included.

This page is generated from the config's models by `python -m ddpmkit.run.reference > docs/config.md`
(a test fails when it is stale): edit the `description` of a field in `ddpmkit/run/config.py`, or a component's
`Options`, not this page.
"""


def schema_type(prop: dict[str, Any]) -> str:
    """A short type name for one property of a JSON schema (``one of a, b``, ``integer | null``)."""
    if "enum" in prop:
        return "one of " + ", ".join(map(str, prop["enum"]))
    if "const" in prop:
        return json.dumps(prop["const"])
    if "anyOf" in prop:
        return " | ".join(schema_type(a) for a in prop["anyOf"])
    if prop.get("type") == "array" and "items" in prop:
        return f"array of {schema_type(prop['items'])}"
    if "type" in prop:
        return str(prop["type"])
    if "$ref" in prop:
        return "table"
    return "any"


def options_rows(model: type[BaseModel], defaults: BaseModel | None = None) -> list[tuple[str, str, str, str]]:
    """(key, type, default, description) of each field of ``model``, as its JSON schema says them; ``defaults``:
    the instance whose values are the defaults (a section whose default differs from its model's)."""
    schema = model.model_json_schema()
    rows = []
    for key, prop in schema.get("properties", {}).items():
        if defaults is not None:
            default = _json(getattr(defaults, key))
        elif "default" in prop:
            default = json.dumps(prop["default"])
        else:
            field = model.model_fields[key]
            default = "required" if field.is_required() else _json(field.get_default(call_default_factory=True))
        rows.append((key, schema_type(prop), default, prop.get("description", "")))
    return rows


def _json(value: Any) -> str:
    return json.dumps(value.model_dump(mode="json") if isinstance(value, BaseModel) else value)


def _table(rows: list[tuple[str, str, str, str]]) -> list[str]:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| key | type | default | description |", "| --- | --- | --- | --- |"]
    lines += [f"| `{k}` | {cell(t)} | `{cell(d)}` | {cell(desc)} |" for k, t, d, desc in rows]
    return lines


def _doc(model: type[BaseModel]) -> str:
    """The model's own docstring (not one it inherits), on one line."""
    doc = model.__dict__.get("__doc__") or ""
    return " ".join(inspect.cleandoc(doc).split())


def _sections(model: type[BaseModel], prefix: str, array: bool = False, defaults: BaseModel | None = None) -> list[str]:
    """The table of ``model`` as ``[prefix]`` (its values in ``defaults``), then the tables nested in it."""
    lines = [f"## {'[[' if array else '['}{prefix}{']]' if array else ']'}", ""]
    if doc := _doc(model):
        lines += [doc, ""]
    plain, nested = [], []
    for key, field in model.model_fields.items():
        if field.exclude:
            continue
        inner = _nested_model(field.annotation)
        if inner is not None:
            nested.append((key, *inner))
        else:
            plain.append(key)
    rows = [row for row in options_rows(model, defaults) if row[0] in plain]
    lines += [*_table(rows), ""] if rows else []
    for key, inner, is_list in nested:
        lines += _sections(inner, f"{prefix}.{key}", array=is_list)
    return lines


def _nested_model(annotation: Any) -> tuple[type[BaseModel], bool] | None:
    """The section model a field holds (a table, or a list of them: an array of tables), else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    args = getattr(annotation, "__args__", ())
    if getattr(annotation, "__origin__", None) is list and args and isinstance(args[0], type):
        if issubclass(args[0], BaseModel):
            return args[0], True
    return None


def _component_options() -> list[str]:
    """The options tables of the components ddpmkit ships (``[schedule.options]`` and the others)."""
    from ddpmkit.registry.discovery import load, registry

    lines = [
        "## Built-in components",
        "",
        "`[schedule]`, `[denoiser]` and `[sampler]` each name a component (`name = ...`) and pass it options in",
        "their `options` table, validated by the component's own model. The components ddpmkit ships:",
        "",
    ]
    reg = registry()
    for kind in KINDS:
        for comp in sorted(
            (c for c in reg.components if c.kind == kind and c.plugin.distribution == "ddpmkit"), key=lambda c: c.name
        ):
            cls = load(comp)
            lines += [f"### {kind} `{comp.name}`", ""]
            if doc := " ".join((inspect.getdoc(cls) or "").split("\n\n")[0].split()):
                lines += [doc, ""]
            rows = options_rows(cls.Options) if getattr(cls, "Options", None) is not None else []
            lines += [*_table(rows), ""] if rows else ["No options.", ""]
    return lines


def config_reference() -> str:
    """``docs/config.md``: every table of a run config, then the built-in components' options."""
    lines, defaults = [HEADER], RunConfig()
    for key, field in RunConfig.model_fields.items():
        if field.exclude:
            continue
        inner = _nested_model(field.annotation)
        if inner is None:
            lines += [f"## [{key}]", "", field.description or "", ""]
        else:
            lines += _sections(inner[0], key, array=inner[1], defaults=getattr(defaults, key))
    lines += _component_options()
    return "\n".join(lines).rstrip("\n") + "\n"


if __name__ == "__main__":
    print(config_reference(), end="")
