"""Settings dataclasses declare their bounds and descriptions once, as pydantic `Field`s in `Annotated` types; the
Dagster layer generates its config from them, and core checks values against them here."""

from __future__ import annotations

import dataclasses

from pydantic import TypeAdapter, ValidationError


def bound_violations(settings: object) -> list[str]:
    """Each value of the dataclass `settings` that breaks a bound declared on its field, as `name: problem`."""
    try:
        TypeAdapter(type(settings)).validate_python(dataclasses.asdict(settings))  # type: ignore[arg-type]
    except ValidationError as exc:
        return [f"{'.'.join(str(p) for p in e['loc'])} {e['msg'].replace('Input should be', 'must be')} (got {e['input']!r})" for e in exc.errors()]
    return []
