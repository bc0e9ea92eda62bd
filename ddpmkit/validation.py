"""Turning a pydantic ValidationError into (dotted key, message) pairs a user can act on."""

from __future__ import annotations

import difflib
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel, ValidationError, ValidationInfo, field_validator

#: A setting that ddpmkit chooses by measurement before training (``train.precision = "auto"``, ...).
AUTO = "auto"


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


def _accepts_bool(annotation: Any) -> bool:
    if annotation is bool or annotation is Any:
        return True
    if get_origin(annotation) is Literal:
        return any(isinstance(a, bool) for a in get_args(annotation))
    return any(_accepts_bool(a) for a in get_args(annotation))


def _is_number(annotation: Any) -> bool:
    if annotation in (int, float):
        return True
    return get_origin(annotation) is not Literal and any(_is_number(a) for a in get_args(annotation))


class StrictNumbers(BaseModel):
    """Numbers are numbers: ``true``/``false`` given for an int or float field is an error, not 1/0
    (pydantic's lax mode would take it); everything else validates as usual."""

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, bool) and info.field_name:
            annotation = cls.model_fields[info.field_name].annotation
            if _is_number(annotation) and not _accepts_bool(annotation):
                raise ValueError(f"expected a number, got {str(value).lower()}")
        return value
