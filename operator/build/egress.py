"""The egress proxy's view of a session: egress.json (its provider route and the hosts it tunnels to) and
what the runner's environment says about it.

The provider key is one item of the session Secret (PROVIDER_KEY), mounted into the egress container
alone; egress.json names only the file. The runner gets the placeholder in the provider's key variable,
the proxy's route as the provider's base URL, and the proxy as its HTTPS_PROXY.
"""

from typing import Any
from urllib.parse import urlsplit

from agentbox.crds.providers import NODE_PROXY_SWITCH, PLACEHOLDER_KEY, PROVIDER_APIS, PROXY_VARIABLES
from agentbox.operator.build.common import Session

EGRESS_HOST = "127.0.0.1"
EGRESS_PORT = 8766  # the provider routes
EGRESS_CONNECT_PORT = 8767  # the CONNECT proxy
EGRESS_SECRETS_DIR = "/var/run/agentbox/egress"
PROVIDER_KEY = "provider-key"  # the session Secret's item (and file name) with the provider's key
HTTPS_PORT = 443


def egress_config(session: Session, *, has_key: bool, default_allow: list[str],
                  upstreams: dict[str, str] | None = None) -> dict[str, Any]:
    """egress.json. `has_key`: the session Secret carries PROVIDER_KEY. `default_allow`: the operator's
    hosts for every session. `upstreams`: provider name -> base URL, replacing the public API (tests and
    development point it at a fake provider)."""
    config: dict[str, Any] = {
        "listen": {"host": EGRESS_HOST, "port": EGRESS_PORT, "connectPort": EGRESS_CONNECT_PORT},
        "allow": sorted({*default_allow, *session.spec.egress.allow}), "connectPorts": [HTTPS_PORT]}
    provider = session.spec.provider
    if has_key and provider is not None:
        api = PROVIDER_APIS[provider]
        config["provider"] = {"name": api.name, "upstream": (upstreams or {}).get(api.name, api.upstream),
                              "keyHeader": api.key_header, "keyPrefix": api.key_prefix,
                              "keyFile": f"{EGRESS_SECRETS_DIR}/{PROVIDER_KEY}"}
    return config


def runner_variables(session: Session, *, has_key: bool) -> list[dict[str, str]]:
    """The agent's way out: every request through the proxy, loopback (the gateway, the routes) direct;
    with a key, the provider's variables point at the proxy's route and hold only the placeholder."""
    proxy = f"http://{EGRESS_HOST}:{EGRESS_CONNECT_PORT}"
    env = [{"name": name, "value": "127.0.0.1,localhost,::1" if name.lower() == "no_proxy" else proxy}
           for name in PROXY_VARIABLES if not name.lower().startswith("all_")]
    env.append({"name": NODE_PROXY_SWITCH, "value": "1"})
    provider = session.spec.provider
    if has_key and provider is not None:
        api = PROVIDER_APIS[provider]
        env += [{"name": api.key_variable, "value": PLACEHOLDER_KEY},
                {"name": api.base_url_variable, "value": f"http://{EGRESS_HOST}:{EGRESS_PORT}/{api.name}"}]
    return env


def egress_ports(mcp_upstream_urls: list[str]) -> list[int]:
    """TCP ports the pod may connect out to: HTTPS, plus those the session's MCP servers listen on (the
    gateway connects to them directly, not through the proxy)."""
    ports = {HTTPS_PORT}
    for url in mcp_upstream_urls:
        parts = urlsplit(url)
        ports.add(parts.port or (HTTPS_PORT if parts.scheme == "https" else 80))
    return sorted(ports)
