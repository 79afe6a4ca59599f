"""egress.json: the egress proxy's configuration as the operator renders it (camelCase keys)."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic.alias_generators import to_camel

HOST_PATTERN = r"^(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"


class ConfigError(ValueError):
    """The config file cannot be used; the message names the file and the offending field."""


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)


class Listen(_Model):
    host: str = "127.0.0.1"
    port: int = Field(8766, ge=1, le=65535, description="The provider routes (the agent's base URL)")
    connect_port: int = Field(8767, ge=1, le=65535, description="The CONNECT proxy (the agent's HTTPS_PROXY)")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Provider(_Model):
    """The session's model provider: requests under /<name>/ go to `upstream` with the key added."""

    name: Annotated[str, Field(pattern=r"^[a-z0-9-]+$")]
    upstream: str
    key_header: Annotated[str, Field(pattern=r"^[a-z0-9-]+$")]
    key_prefix: str = ""
    key_file: Path

    @field_validator("upstream")
    @classmethod
    def _https_only(cls, upstream: str) -> str:
        # The key travels only encrypted; plain http is for fake providers on loopback (tests).
        parts = urlsplit(upstream)
        if not parts.hostname or not (parts.scheme == "https" or (parts.scheme == "http"
                                                                  and _loopback(parts.hostname))):
            raise ValueError("must be an https:// URL (http:// only to a loopback address)")
        return upstream.rstrip("/")

    def key(self) -> str:
        return self.key_file.read_text().strip()


class EgressConfig(_Model):
    listen: Listen = Field(default_factory=Listen)
    provider: Provider | None = None
    allow: list[Annotated[str, Field(pattern=HOST_PATTERN, max_length=253)]] = Field(default_factory=list)
    connect_ports: list[Annotated[int, Field(ge=1, le=65535)]] = Field(default_factory=lambda: [443])
    # Loopback and private addresses are refused after resolution unless this is set (tests, development):
    # the pod's NetworkPolicy refuses them too, so this is the second line.
    allow_private_networks: bool = False


def load(path: Path) -> EgressConfig:
    try:
        return EgressConfig.model_validate(json.loads(path.read_text()))
    except OSError as error:
        raise ConfigError(f"{path}: cannot read ({error.strerror})") from error
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}: not JSON ({error})") from error
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise ConfigError(f"{path}: {where}: {first['msg']}") from error
