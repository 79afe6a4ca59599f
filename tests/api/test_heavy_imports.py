"""Heavy libraries load with the API's modules, before the first request: a first import inside a route
runs on the event loop and stalls every request in flight meanwhile."""

from __future__ import annotations

import subprocess
import sys


def test_fastmcp_is_loaded_with_the_mcp_router_not_by_its_first_test_request():
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, agentbox.api.routers.mcp; print('fastmcp' in sys.modules)"],
        capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    assert loaded == "True"
