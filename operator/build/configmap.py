"""The session ConfigMap: gateway.json, egress.json and the system prompt, mounted at /etc/agentbox."""

import json
from typing import Any

from agentbox.operator.build.common import Session

CONFIG_DIR = "/etc/agentbox"
GATEWAY_CONFIG_KEY = "gateway.json"
EGRESS_CONFIG_KEY = "egress.json"
SYSTEM_PROMPT_KEY = "system-prompt.md"


def build_configmap(session: Session, gateway_config: dict[str, Any],
                    egress_config: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": session.metadata(),
            "data": {GATEWAY_CONFIG_KEY: json.dumps(gateway_config, indent=2, sort_keys=True),
                     EGRESS_CONFIG_KEY: json.dumps(egress_config, indent=2, sort_keys=True),
                     SYSTEM_PROMPT_KEY: session.spec.system_prompt}}
