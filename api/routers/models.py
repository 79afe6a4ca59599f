"""Request and response bodies shared by the routers: camelCase on the wire, unknown fields refused, and
no NUL characters in any string (PostgreSQL text cannot hold them, so they would fail late as a 500)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator
from pydantic.alias_generators import to_camel
from pydantic_core import InitErrorDetails, PydanticCustomError


def _holds_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_holds_nul(key) or _holds_nul(item) for key, item in value.items())
    if isinstance(value, list | tuple | set | frozenset):
        return any(_holds_nul(item) for item in value)
    if isinstance(value, BaseModel):
        return any(_holds_nul(item) for item in value.__dict__.values())
    return False


class ApiModel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    @field_validator("*", mode="after")
    @classmethod
    def _no_nul_characters(cls, value: Any) -> Any:
        if _holds_nul(value):
            raise ValueError("must not contain NUL characters (\\u0000)")
        return value


def invalid_field(path: str, message: str, value: Any) -> ValidationError:
    """For a model validator whose check spans fields: an error naming the field at fault by its dotted
    path in the model (`url`, `agent.image`), reported as `body.<path>` rather than as the whole body."""
    # Passed as data, not as a template: the message may hold braces.
    error = PydanticCustomError("value_error", "{message}", {"message": message})
    return ValidationError.from_exception_data("invalid", [
        InitErrorDetails(type=error, loc=tuple(path.split(".")), input=value)])
