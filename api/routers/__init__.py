"""One router per resource; `mount_routers` is the single list of what the API serves."""

from __future__ import annotations

from fastapi import FastAPI


def mount_routers(app: FastAPI) -> None:
    from agentbox.api.routers import audit, health, mcp, oauth, orgs, prompts, provider_keys, sessions

    for module in (health, orgs, sessions, mcp, oauth, prompts, provider_keys, audit):
        app.include_router(module.router)
