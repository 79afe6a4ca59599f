"""agentbox.api: the control-plane REST API (FastAPI) the frontend talks to."""
