"""Parameters the reporting endpoints share: the attribution filters every report and the
recommendations take, and numbers that arrive as query-string text."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field


def whole_number(value: Any) -> Any:
    """Query strings are text: "10" is 10; anything else is left for the field to refuse."""
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return value


QueryInt = Annotated[int, BeforeValidator(whole_number)]


class Filters(BaseModel):
    """Exact matches on the rollups' attribution dimensions; every other name is refused."""

    model_config = ConfigDict(extra="forbid")

    provider: str | None = Field(None, max_length=64)
    model: str | None = Field(None, max_length=128)
    team_id: str | None = Field(None, max_length=128)
    project_id: str | None = Field(None, max_length=128)
    user_id: str | None = Field(None, max_length=128)
    feature: str | None = Field(None, max_length=128)
    agent: str | None = Field(None, max_length=128)
    task_type: str | None = Field(None, max_length=128)
