"""The egress proxy of a session pod: the agent's only holder-free way to its model API and the web."""
