"""The API's settings, read from AGENTBOX_* environment variables (contract.md, "Names and layout")."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="AGENTBOX_", extra="ignore", frozen=True)

    # Network: the API listens on loopback unless told otherwise.
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=1, le=65535)

    database_url: SecretStr | None = None

    jwt_issuer: str | None = None
    jwt_audience: str = "authenticated"
    jwt_jwks_url: str | None = None
    jwt_hs256_secret: SecretStr | None = None
    jwt_leeway_seconds: float = Field(default=30, ge=0, le=300)
    # An unknown `kid` triggers at most one JWKS refetch per cooldown window.
    jwks_refetch_cooldown_seconds: float = Field(default=60, gt=0)
    # A known key set is refreshed in the background after this long (Supabase's edge caches 10 minutes).
    jwks_max_age_seconds: float = Field(default=600, gt=0)
    # Stale policy: when the JWKS endpoint fails, keys last fetched within this window keep verifying.
    jwks_max_stale_seconds: float = Field(default=86_400, gt=0)
    jwks_fetch_timeout_seconds: float = Field(default=5, gt=0)

    # `key-id:base64-32-bytes`, comma separated or a JSON list; the first encrypts, all decrypt.
    encryption_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)

    max_body_bytes: int = Field(default=1_048_576, gt=0)
    # The request line and headers: a request whose header block is still incomplete past this many
    # bytes is refused by the server (h11) with 400 (api/__main__.py).
    max_header_bytes: int = Field(default=32_768, ge=4096)
    log_level: str = "INFO"

    tenant_namespace_prefix: str = "tenant-"
    # How the API reaches a session's runner: `service` (in the cluster: the session's Service) or
    # `port-forward` (outside it: the pod's port through the Kubernetes API, as kubectl port-forward does).
    runner_transport: Literal["service", "port-forward"] = "service"
    # A port-forward listener with no connection for this long is closed.
    runner_forward_idle_seconds: float = Field(default=300, gt=0)
    runner_timeout_seconds: float = Field(default=30, gt=0)
    # A message to a session suspended for idleness resumes it and waits this long for it to be Ready
    # (then 504); the same bound again for its port to answer.
    resume_timeout_seconds: float = Field(default=120, gt=0, le=600)
    kube_timeout_seconds: float = Field(default=10, gt=0)
    readiness_timeout_seconds: float = Field(default=2, gt=0)
    mcp_test_timeout_seconds: float = Field(default=15, gt=0, le=120)
    # POST /api/v1/mcp/test and the OAuth calls for MCP servers (discovery, client registration, token and
    # revocation requests) refuse private-network and loopback addresses unless this is true (development
    # and tests); link-local and metadata addresses are refused always (agentbox.api.egress).
    mcp_test_allow_private_networks: bool = False
    # Reverse proxies (addresses or CIDRs, comma-separated; `*` any) whose X-Forwarded-For and
    # X-Forwarded-Proto are believed: the client address in the audit log and the scheme of the OAuth
    # redirect URI then come from them. Empty: the connection's own peer, headers ignored.
    trusted_proxies: Annotated[list[str], NoDecode] = Field(default_factory=list)

    # OAuth for MCP servers. The redirect URI is <public_url>/api/v1/mcp/oauth/callback (the request's own
    # base URL when unset); the callback then sends the browser to frontend_url with the outcome.
    public_url: str | None = Field(default=None, pattern=r"^https?://[^\s?#]+$")
    frontend_url: str | None = Field(default=None, pattern=r"^https?://[^\s#]+$")
    # Pre-registered clients by issuer, JSON: {"https://issuer": {"clientId": "...", "clientSecret": "..."}}.
    oauth_clients: SecretStr | None = None
    oauth_client_name: str = "agentbox"
    oauth_http_timeout_seconds: float = Field(default=10, gt=0, le=60)
    # Tokens expiring within the window are refreshed; the background pass runs every interval.
    oauth_refresh_window_seconds: float = Field(default=300, ge=0)
    oauth_refresh_interval_seconds: float = Field(default=60, gt=0)
    # Refreshes of one connection serialise across replicas; a waiter gives up (409) after this long.
    oauth_refresh_lock_timeout_seconds: float = Field(default=15, gt=0, le=60)
    # Callbacks that name no org (missing, malformed or unknown state) are audited in the platform chain
    # up to this many rows a minute per replica; the next row counts the ones left out.
    oauth_stranger_callback_audit_per_minute: float = Field(default=60, ge=1)

    # How often the audit table's coming monthly partitions are ensured (also once at start-up).
    audit_partition_interval_seconds: float = Field(default=86_400, gt=0)
    # Signed audit checkpoints (agentbox.api.audit_checkpoints): every interval, each chain's head is
    # signed with this Ed25519 key (PEM, or base64 of the 32-byte private key), which the database never
    # holds; the latest signature per chain is kept in the directory and every new one is logged. The
    # verifier also trusts the listed public keys (base64 of 32 bytes, comma separated or a JSON list:
    # keys rotated out, or all it has when this API only verifies).
    audit_checkpoint_signing_key: SecretStr | None = None
    audit_checkpoint_dir: Path | None = None
    audit_checkpoint_trusted_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    audit_checkpoint_interval_seconds: float = Field(default=300, gt=0)

    prompt_max_chars: int = Field(default=20_000, gt=0)
    composed_prompt_max_chars: int = Field(default=60_000, gt=0)
    # All of one composition's templates render within this (a template is code its author wrote).
    prompt_render_timeout_seconds: float = Field(default=1.0, gt=0, le=30)

    @field_validator("encryption_keys", "audit_checkpoint_trusted_keys", "trusted_proxies", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _proxies_are_addresses(cls, value: list[str]) -> list[str]:
        for entry in value:
            if entry != "*":
                try:
                    ipaddress.ip_network(entry, strict=False)
                except ValueError:
                    raise ValueError(f"AGENTBOX_TRUSTED_PROXIES: {entry!r} is no address or CIDR") from None
        return value

    @field_validator("jwt_issuer")
    @classmethod
    def _issuer_not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("AGENTBOX_JWT_ISSUER must not be blank")
        return value

    @model_validator(mode="after")
    def _a_directory_for_signed_checkpoints(self) -> Settings:
        if self.audit_checkpoint_signing_key is not None and self.audit_checkpoint_dir is None:
            raise ValueError("AGENTBOX_AUDIT_CHECKPOINT_SIGNING_KEY needs AGENTBOX_AUDIT_CHECKPOINT_DIR "
                             "(where the latest checkpoint of each chain is kept)")
        return self

    @model_validator(mode="after")
    def _a_key_source_when_an_issuer_is_set(self) -> Settings:
        if self.jwt_issuer and not (self.jwt_jwks_url or self.jwt_hs256_secret):
            raise ValueError("AGENTBOX_JWT_ISSUER needs AGENTBOX_JWT_JWKS_URL or AGENTBOX_JWT_HS256_SECRET")
        return self
