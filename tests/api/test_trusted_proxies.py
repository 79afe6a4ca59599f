"""Behind a reverse proxy the API believes X-Forwarded-For/-Proto from the proxies it is told to trust,
and from no one else."""

from __future__ import annotations

import httpx
import pytest
from fastapi import Request
from pydantic import ValidationError

from agentbox.api.app import Services, create_app
from agentbox.api.settings import Settings

FORWARDED = {"X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "https"}


async def _seen(settings: Settings, peer: str) -> dict[str, str]:
    app = create_app(services_override=Services(settings=settings))

    @app.get("/seen")
    async def seen(request: Request) -> dict[str, str]:
        return {"client": request.client.host if request.client else "", "scheme": request.url.scheme}

    transport = httpx.ASGITransport(app, client=(peer, 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://api.test") as api:
        return (await api.get("/seen", headers=FORWARDED)).json()


async def test_a_trusted_proxy_names_the_client_and_the_scheme():
    settings = Settings(trusted_proxies=["10.0.0.0/8"])
    assert await _seen(settings, "10.1.2.3") == {"client": "203.0.113.9", "scheme": "https"}


async def test_anyone_else_s_forwarded_headers_are_ignored():
    assert await _seen(Settings(trusted_proxies=["10.0.0.0/8"]), "192.0.2.1") == {
        "client": "192.0.2.1", "scheme": "http"}
    assert await _seen(Settings(), "10.1.2.3") == {"client": "10.1.2.3", "scheme": "http"}


def test_the_setting_is_a_comma_separated_list_of_addresses(monkeypatch):
    monkeypatch.setenv("AGENTBOX_TRUSTED_PROXIES", "10.0.0.0/8, 192.0.2.7,*")
    assert Settings().trusted_proxies == ["10.0.0.0/8", "192.0.2.7", "*"]
    with pytest.raises(ValidationError, match="'ingress' is no address or CIDR"):
        Settings(trusted_proxies="ingress")
