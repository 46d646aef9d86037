"""Dagster config classes generated from core's settings dataclasses, so every knob core has is reachable from the
launchpad with core's own default, description and bounds, and no field list is copied by hand."""

import dataclasses
import typing
from typing import Any

import pydantic


def _launchpad_type(annotation: Any, default: Any) -> tuple[Any, Any]:
    """Dagster config has lists, not tuples: a `tuple[str, ...]` field becomes a `list[str]`."""
    base, *extras = typing.get_args(annotation) if typing.get_origin(annotation) is typing.Annotated else (annotation,)
    if typing.get_origin(base) is tuple:
        item = typing.get_args(base)[0]
        listed = list[item]  # type: ignore[valid-type]
        return (typing.Annotated[listed, *extras] if extras else listed), list(default)
    return annotation, default


def fields_of(settings: type, *, exclude: tuple[str, ...] = ()) -> dict[str, tuple[Any, Any]]:
    """`{name: (annotation, default)}` for each field of the dataclass `settings`, ready for `pydantic.create_model`;
    dataclass-typed fields (nested settings) are left out for the caller to flatten."""
    hints = typing.get_type_hints(settings, include_extras=True)
    out = {}
    for f in dataclasses.fields(settings):
        if f.name in exclude or dataclasses.is_dataclass(hints[f.name]):
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        out[f.name] = _launchpad_type(hints[f.name], default)
    return out


def config_class(name: str, base: type[pydantic.BaseModel], *settings: type, exclude: tuple[str, ...] = ()) -> Any:
    """A subclass of `base` (dg.Config or dg.ConfigurableResource) with the fields of every `settings` dataclass."""
    fields: dict[str, tuple[Any, Any]] = {}
    for cls in settings:
        fields |= fields_of(cls, exclude=exclude)
    return pydantic.create_model(name, __base__=base, **fields)  # type: ignore[call-overload]


def values_for(settings: type, config: pydantic.BaseModel, **overrides: Any) -> dict[str, Any]:
    """The values of `config` that are fields of the dataclass `settings`, plus `overrides`."""
    names = {f.name for f in dataclasses.fields(settings)}
    return {k: v for k, v in config.model_dump().items() if k in names} | overrides
