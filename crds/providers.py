"""The model providers whose API keys the platform keeps: where each one's API lives, how its key is sent,
and which variables each agent reads for its key and base URL. One home for the API (which resolves a
session's key), the operator (which renders the egress proxy's routes and the runner's variables) and the
CRD (which refuses those variables in spec.agent.env).

The agent never holds a key: it gets PLACEHOLDER_KEY in its key variable and the egress proxy's route as
its base URL; the proxy drops whatever credential the agent sent and adds the real one, on requests to
the provider's upstream only.
"""

from dataclasses import dataclass
from typing import Literal

Provider = Literal["anthropic", "gemini", "openai"]
PROVIDERS: tuple[Provider, ...] = ("anthropic", "gemini", "openai")
# What the agent's key variable holds: not a secret, and useless anywhere but through the proxy.
PLACEHOLDER_KEY = "agentbox-placeholder-key"


@dataclass(frozen=True)
class ProviderApi:
    name: Provider
    upstream: str  # the base URL the proxy forwards to (path included: OpenAI's clients expect /v1)
    key_header: str  # where the provider reads the key
    key_prefix: str  # put before the key in that header ("Bearer ")
    key_variable: str  # the agent's variable for the key (set to PLACEHOLDER_KEY)
    base_url_variable: str  # the agent's variable for the API's base URL (set to the proxy's route)


PROVIDER_APIS: dict[Provider, ProviderApi] = {
    # Claude Code sends ANTHROPIC_API_KEY as X-Api-Key and appends /v1/messages to ANTHROPIC_BASE_URL.
    "anthropic": ProviderApi("anthropic", "https://api.anthropic.com", "x-api-key", "", "ANTHROPIC_API_KEY",
                             "ANTHROPIC_BASE_URL"),
    # Gemini CLI (@google/genai) sends GEMINI_API_KEY as x-goog-api-key; GOOGLE_GEMINI_BASE_URL moves it.
    "gemini": ProviderApi("gemini", "https://generativelanguage.googleapis.com", "x-goog-api-key", "",
                          "GEMINI_API_KEY", "GOOGLE_GEMINI_BASE_URL"),
    # Codex sends OPENAI_API_KEY as a bearer token; OPENAI_BASE_URL includes the /v1.
    "openai": ProviderApi("openai", "https://api.openai.com/v1", "authorization", "Bearer ", "OPENAI_API_KEY",
                          "OPENAI_BASE_URL"),
}

# The provider each runtime talks to; scripted and custom sessions name one in spec.egress.provider.
RUNTIME_PROVIDERS: dict[str, Provider] = {"claude-code": "anthropic", "gemini": "gemini", "codex": "openai"}

# Variables the platform sets on the agent when the proxy is in the pod, or that would hand the agent a
# provider credential in plain text (the CR and the pod spec are readable): refused in spec.agent.env.
PROXY_VARIABLES = ("HTTPS_PROXY", "HTTP_PROXY", "NO_PROXY", "ALL_PROXY", "https_proxy", "http_proxy",
                   "no_proxy", "all_proxy")
# Node.js (22.21 and later) sends fetch() and node:http(s) through the proxy variables only with this set.
NODE_PROXY_SWITCH = "NODE_USE_ENV_PROXY"
CREDENTIAL_VARIABLES = ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "CLAUDE_CODE_OAUTH_TOKEN",
                        "GEMINI_API_KEY", "GOOGLE_API_KEY", "OPENAI_API_KEY", "CODEX_API_KEY")
RESERVED_ENV_NAMES = tuple(sorted({*CREDENTIAL_VARIABLES, *PROXY_VARIABLES, NODE_PROXY_SWITCH,
                                   *(api.base_url_variable for api in PROVIDER_APIS.values())}))

