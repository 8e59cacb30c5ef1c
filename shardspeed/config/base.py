"""The strict base model every config section derives from, and the field types they share.

Every section forbids unknown keys (DeepSpeed silently ignores unknown top-level keys, a
well-known source of silent misconfiguration), and integer fields accept the float spellings
DeepSpeed users write (`2e8`) as long as the value is integral.
"""
from __future__ import annotations

import math
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict


def _integral(value: Any) -> Any:
    """Let `2e8` (a JSON float) stand for the integer 200000000; reject 2.5."""
    if isinstance(value, float):
        if math.isfinite(value) and value.is_integer():
            return int(value)
        raise ValueError(f"expected an integer, got {value!r}")
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return value  # let pydantic report the type error
        if number.is_integer():
            return int(number)
    return value


Int = Annotated[int, BeforeValidator(_integral)]
"""An integer that may be written as an integral float (`5e8`)."""


class StrictModel(BaseModel):
    """A config section: unknown keys fail, aliases and field names are both accepted."""

    # Fields write their default as `Field(default=...)`: type checkers read a field's default
    # from the keyword only, and would otherwise make every such field a required argument.

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=False)

    @classmethod
    def accepted_keys(cls) -> set[str]:
        """Every spelling this section accepts: field names and their aliases."""
        keys: set[str] = set()
        for name, field in cls.model_fields.items():
            keys.add(name)
            if field.alias:
                keys.add(field.alias)
            if field.validation_alias and isinstance(field.validation_alias, str):
                keys.add(field.validation_alias)
        return keys
