"""JSON logs on stderr for both sandbox processes (the container runtime collects them)."""

from __future__ import annotations

import logging
import os

from pythonjsonlogger.json import JsonFormatter


def configure_logging() -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logging.basicConfig(level=os.environ.get("AGENTBOX_LOG_LEVEL", "INFO").upper(), handlers=[handler])
