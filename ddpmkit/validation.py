"""Turning a pydantic ValidationError into (dotted key, message) pairs a user can act on."""

from __future__ import annotations

import difflib

from pydantic import BaseModel, ValidationError


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """The keys the (nested) model accepts at ``loc``'s parent, for "did you mean" hints."""
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


def problems(exc: ValidationError, model: type[BaseModel], prefix: tuple = ()) -> list[tuple[str, str]]:
    """One (``prefix.key``, message) per error; unknown keys get a "did you mean" where one is close."""
    out = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
            close = difflib.get_close_matches(str(loc[-1]), _allowed_keys(model, loc), n=1)
            if close:
                msg += f" (did you mean '{close[0]}'?)"
        out.append((".".join(str(p) for p in prefix + loc), msg))
    return out
