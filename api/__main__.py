"""`python -m agentbox.api` / `agentbox-api`: serve the API with uvicorn (one process, settings from env)."""

from __future__ import annotations

import uvicorn

from agentbox.api.app import create_app
from agentbox.api.observability import configure_logging
from agentbox.api.settings import Settings


def main() -> None:
    settings = Settings()
    configure_logging(settings.log_level)
    # h11 rather than httptools (uvicorn's default when installed): httptools buffers a header block of
    # any size, h11 refuses one that is still incomplete past the limit.
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_config=None,
                proxy_headers=False, server_header=False, http="h11",
                h11_max_incomplete_event_size=settings.max_header_bytes)


if __name__ == "__main__":
    main()
