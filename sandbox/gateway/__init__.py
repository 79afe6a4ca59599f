"""The MCP gateway sidecar: `python -m agentbox.sandbox.gateway`."""
