"""Entry point: `python -m agentbox.sandbox.egress` (config path from AGENTBOX_EGRESS_CONFIG)."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import uvicorn
import uvloop

from agentbox.sandbox.egress.config import EgressConfig, load
from agentbox.sandbox.egress.providers import build_app
from agentbox.sandbox.egress.tunnel import TunnelProxy
from agentbox.sandbox.logs import configure_logging

DEFAULT_CONFIG = "/etc/agentbox/egress.json"


async def serve(config: EgressConfig) -> None:
    """Both listeners, on loopback: the pod's other containers share it, nothing outside the pod does."""
    tunnel = TunnelProxy(config.allow, config.connect_ports,
                         allow_private_networks=config.allow_private_networks)
    connect_server = await asyncio.start_server(tunnel.handle, config.listen.host, config.listen.connect_port)
    routes = uvicorn.Server(uvicorn.Config(build_app(config.provider), host=config.listen.host,
                                           port=config.listen.port, log_config=None, access_log=False))
    async with connect_server:
        await routes.serve()


def main() -> None:
    configure_logging()
    config = load(Path(os.environ.get("AGENTBOX_EGRESS_CONFIG", DEFAULT_CONFIG)))
    logging.getLogger("agentbox.egress").info(
        "egress proxy starting", extra={"provider": config.provider.name if config.provider else None,
                                        "allow": config.allow})
    uvloop.run(serve(config))


if __name__ == "__main__":
    main()
