"""Which ACP auth method the runner authenticates with, and what it says when the agent still refuses.

ACP agents list `authMethods` in their `initialize` answer; some refuse `session/new` with the
auth-required error (-32000) until the client calls `authenticate` with one of them. Method ids as the
pinned adapters (sandbox/images/agents.json) advertise them to the runner: Gemini CLI `oauth-personal`,
`gemini-api-key`, `vertex-ai`, `gateway`; codex-acp `api-key` (it reads CODEX_API_KEY, else
OPENAI_API_KEY) and `chat-gpt` (a browser login; not offered when NO_BROWSER is set); claude-agent-acp
none (its logins are offered only to clients with a terminal), and it reads ANTHROPIC_API_KEY or
CLAUDE_CODE_OAUTH_TOKEN by itself and refuses the first prompt without them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from agentbox.sandbox.runner.failures import describe_error

AUTH_METHOD_VARIABLE = "AGENTBOX_AGENT_AUTH_METHOD"
AUTH_REQUIRED_CODE = -32000  # ACP's auth_required error

# Per runtime, in order of preference: a method id and the variables that must all be non-empty in the
# agent's environment for it to work without a person at a browser. Logins (oauth-personal, chat-gpt,
# claude-agent-acp's terminal logins) need one, so they are never chosen unless
# AGENTBOX_AGENT_AUTH_METHOD names them.
DEFAULT_AUTH_METHODS: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    "gemini": (
        ("gemini-api-key", ("GEMINI_API_KEY",)),
        ("vertex-ai", ("GOOGLE_CLOUD_PROJECT", "GOOGLE_CLOUD_LOCATION")),
        ("vertex-ai", ("GOOGLE_API_KEY",)),  # Vertex AI express mode
    ),
    "codex": (
        ("api-key", ("CODEX_API_KEY",)),
        ("api-key", ("OPENAI_API_KEY",)),
    ),
    "scripted": (("scripted-api-key", ("AGENTBOX_SCRIPTED_API_KEY",)),),
}

# Runtimes that read their credentials by themselves, with no method to authenticate with: what a refusal
# tells the user to set.
SELF_READ_CREDENTIALS: dict[str, tuple[str, ...]] = {
    "claude-code": ("ANTHROPIC_API_KEY", "CLAUDE_CODE_OAUTH_TOKEN"),
}


class AuthConfigError(Exception):
    """The platform asked for a method the agent does not offer."""


@dataclass(frozen=True)
class AuthPolicy:
    runtime: str
    explicit: str | None  # AGENTBOX_AGENT_AUTH_METHOD
    environ: Mapping[str, str]  # the agent's environment

    def choose(self, advertised: Sequence[str]) -> str | None:
        """The method to authenticate with, or None to go straight to `session/new`."""
        if not advertised:
            return None
        if self.explicit:
            if self.explicit not in advertised:
                raise AuthConfigError(f"{AUTH_METHOD_VARIABLE}: the agent does not offer {self.explicit!r}; "
                                      f"it advertises {', '.join(advertised)}")
            return self.explicit
        for method_id, variables in DEFAULT_AUTH_METHODS.get(self.runtime, ()):
            if method_id in advertised and all(self.environ.get(name) for name in variables):
                return method_id
        return None

    def refusal(self, advertised: Sequence[Any], tried: str | None, error: Exception,
                refused: str | None = None) -> str:
        """What the runner reports when the agent will not work for lack of authentication. `refused`: the
        request it refused after the session opened (claude-agent-acp refuses the first session/prompt)."""
        ids = [method.id for method in advertised]
        if refused:
            what = f"it refused {refused}" + (f" after authenticate({tried!r})" if tried else "")
        else:
            what = f"authenticate({tried!r}) failed" if tried else "no auth method was chosen"
        parts = [f"the agent requires authentication: {what} ({describe_error(error)})"]
        if self.runtime in SELF_READ_CREDENTIALS:  # its advertised methods are logins a person does
            variables = " or ".join(SELF_READ_CREDENTIALS[self.runtime])
            parts.append(f"{self.runtime} reads {variables}: store a provider key for the session (its "
                         "spec.egress.providerKey; the API's /api/v1/provider-keys)")
        elif ids:
            parts.append(f"it advertises {', '.join(ids)}; set {AUTH_METHOD_VARIABLE} in the session's "
                         "agent.env to one of them, with the credentials it needs")
        else:
            parts.append("it advertises no auth methods; give it its credentials in the session's agent.env")
        # Per method, the sets of variables that work, any one of them: what an env_var method declares
        # beats the built-in defaults.
        needs = {method.id: [[var.name for var in method.vars]] for method in advertised
                 if getattr(method, "vars", None)}
        defaults: dict[str, list[list[str]]] = {}
        for method_id, variables in DEFAULT_AUTH_METHODS.get(self.runtime, ()):
            if method_id in ids:
                defaults.setdefault(method_id, []).append(list(variables))
        for method_id, alternatives in defaults.items():
            needs.setdefault(method_id, alternatives)
        parts += [f"{method_id} reads " + " or ".join(" and ".join(variables) for variables in alternatives)
                  for method_id, alternatives in needs.items()]
        return "; ".join(parts)


def is_auth_required(error: Exception) -> bool:
    return getattr(error, "code", None) == AUTH_REQUIRED_CODE
