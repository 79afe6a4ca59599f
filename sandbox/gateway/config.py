"""gateway.json: the MCP gateway's configuration as the operator renders it (camelCase keys)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.alias_generators import to_camel

DNS_LABEL = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"


class ConfigError(ValueError):
    """The config file cannot be used; the message names the file and the offending field."""


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)


class Listen(_Model):
    host: str = "127.0.0.1"
    port: int = Field(8765, ge=1, le=65535)


class Auth(_Model):
    type: Literal["none", "bearer", "oauth"] = "none"
    token_file: Path | None = None

    @model_validator(mode="after")
    def _token_file_when_needed(self) -> Auth:
        if self.type != "none" and self.token_file is None:
            raise ValueError(f"auth type {self.type!r} needs tokenFile")
        return self

    def token(self) -> str | None:
        """Read on every (re)connect so a rotated Secret is picked up without a restart."""
        if self.type == "none" or self.token_file is None:
            return None
        return self.token_file.read_text().strip()


class Header(_Model):
    name: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")]
    value: str | None = None
    value_file: Path | None = None

    @model_validator(mode="after")
    def _exactly_one_source(self) -> Header:
        if (self.value is None) == (self.value_file is None):
            raise ValueError(f"header {self.name!r} needs exactly one of value or valueFile")
        if self.name.lower() == "authorization":
            raise ValueError("set the Authorization header through auth, not headers")
        return self

    def resolve(self) -> str:
        if self.value is not None:
            return self.value
        assert self.value_file is not None
        return self.value_file.read_text().strip()


class ToolFilter(_Model):
    """Upstream tool names (before namespacing). An empty allow list allows everything; deny wins."""

    allow: list[str] = []
    deny: list[str] = []

    def permits(self, tool: str) -> bool:
        return tool not in self.deny and (not self.allow or tool in self.allow)


class Upstream(_Model):
    name: Annotated[str, Field(pattern=DNS_LABEL)]
    transport: Literal["streamable-http", "sse", "stdio"]
    url: str | None = None
    command: str | None = None
    args: list[str] = []
    env: dict[str, str] = {}
    # stdio only: variables whose values live in mounted Secret files, read at every (re)start.
    env_files: dict[str, Path] = {}
    auth: Auth = Auth()
    headers: list[Header] = []
    tools: ToolFilter = ToolFilter()
    timeout_seconds: float = Field(30.0, gt=0, le=3600)

    @model_validator(mode="after")
    def _fields_match_transport(self) -> Upstream:
        if self.transport == "stdio":
            if not self.command:
                raise ValueError("transport stdio needs command")
            if self.url is not None:
                raise ValueError("transport stdio takes no url")
            clashing = sorted(set(self.env) & set(self.env_files))
            if clashing:
                raise ValueError(f"env and envFiles both set {clashing}")
        else:
            if self.env or self.env_files:
                raise ValueError(f"transport {self.transport} takes no env or envFiles")
            if not self.url or not self.url.startswith(("http://", "https://")):
                raise ValueError(f"transport {self.transport} needs an http(s) url")
            if self.command is not None:
                raise ValueError(f"transport {self.transport} takes no command")
        return self


    def process_env(self) -> dict[str, str]:
        """The stdio server's environment: plain values plus those read from their Secret files."""
        return {**self.env, **{name: path.read_text().strip() for name, path in self.env_files.items()}}


class Breaker(_Model):
    """When to stop calling a failing upstream (consecutive failures) and how long before a retry."""

    failure_threshold: int = Field(3, ge=1)
    reset_seconds: float = Field(10.0, gt=0)


class GatewayConfig(_Model):
    listen: Listen = Listen()
    upstreams: list[Upstream] = []
    breaker: Breaker = Breaker()

    @model_validator(mode="after")
    def _unique_names(self) -> GatewayConfig:
        names = [upstream.name for upstream in self.upstreams]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"upstream names must be unique: {duplicates}")
        return self


def _describe(error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(top level)"
        parts.append(f"{where}: {item['msg']}")
    return "; ".join(parts)


def parse_config(text: str, source: str = "gateway.json") -> GatewayConfig:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(f"{source}: not valid JSON: {error}") from error
    try:
        return GatewayConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(f"{source}: {_describe(error)}") from error


def load_config(path: Path) -> GatewayConfig:
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigError(f"{path}: cannot read: {error.strerror}") from error
    return parse_config(text, str(path))
