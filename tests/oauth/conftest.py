"""Shared by the OAuth tests: a loopback HTTP server helper and API tokens (from the API tests' helpers)."""

from __future__ import annotations

from api.conftest import AUDIENCE, HS256_SECRET, ISSUER, hs256, serve

__all__ = ["AUDIENCE", "HS256_SECRET", "ISSUER", "hs256", "serve"]
