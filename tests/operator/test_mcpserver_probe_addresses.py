"""The operator's MCP probe module (pure, no cluster)."""

import subprocess
import sys


def test_fastmcp_is_loaded_with_the_probe_module_not_in_the_first_probe():
    loaded = subprocess.run([sys.executable, "-c", "import sys, agentbox.operator.probe; "
                             "print('fastmcp' in sys.modules)"], capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "True"
