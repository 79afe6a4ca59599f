"""Request bodies, pure: NUL characters are refused by field before anything reaches PostgreSQL."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from agentbox.api.routers.mcp import ConfigurationBody
from agentbox.api.routers.prompts import PromptCreate

FILES = {"name": "files", "transport": "stdio", "stdio": {"command": "npx", "args": ["-y"]}}


@pytest.mark.parametrize(("body", "field"), [
    ({**FILES, "description": "a\x00b"}, "description"),
    ({**FILES, "stdio": {"command": "npx", "args": ["ok", "b\x00d"]}}, "stdio"),
    ({**FILES, "stdioEnv": {"KEY": "v\x00"}}, "stdioEnv"),
])
def test_nul_characters_are_refused_naming_the_field(body, field):
    with pytest.raises(ValidationError) as caught:
        ConfigurationBody.model_validate(body)
    error = caught.value.errors()[0]
    assert error["loc"][0] == field and "NUL" in error["msg"]


def test_nul_in_a_prompt_is_refused_and_clean_bodies_pass():
    with pytest.raises(ValidationError, match="NUL"):
        PromptCreate.model_validate({"scope": "user", "name": "p", "content": "x\x00"})
    assert ConfigurationBody.model_validate({**FILES, "description": "tab\tand newline\n"}).description
