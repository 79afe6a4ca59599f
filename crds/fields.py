"""Field types shared by the custom resources: names, quantities, durations, conditions.

Each type carries the constraints that end up in the CRD schema, so the API (Pydantic) and the
apiserver (OpenAPI) reject the same input.
"""

import re
from datetime import datetime, timedelta
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints
from pydantic.alias_generators import to_camel

from agentbox.crds.conditions import ConditionStatus

DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
# A positive Kubernetes quantity without sign, e.g. 1Gi, 500M, 1.5e9.
QUANTITY_PATTERN = r"^([0-9]+(\.[0-9]*)?|\.[0-9]+)([KMGTPE]i|[mkMGTPE]|[eE][0-9]+)?$"
# Go's time.ParseDuration syntax restricted to non-negative values, e.g. 30s, 1h30m.
DURATION_PATTERN = r"^([0-9]+(\.[0-9]+)?(ns|us|ms|s|m|h))+$"

DnsLabel = Annotated[str, StringConstraints(pattern=DNS_LABEL_PATTERN, min_length=1, max_length=63)]
DnsSubdomain = Annotated[str, StringConstraints(pattern=DNS_SUBDOMAIN_PATTERN, min_length=1, max_length=253)]


def parse_duration(text: str) -> timedelta:
    """A Go-style duration ("1h30m", "45s") as a timedelta.

    Hand-written: the format is a dozen lines and no installed library parses Go durations.
    """
    if not re.fullmatch(DURATION_PATTERN, text):
        raise ValueError(f"{text!r} is not a duration such as 30s, 15m or 1h30m")
    units = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}
    seconds = sum(float(number) * units[unit]
                  for number, _, unit in re.findall(r"([0-9]+(\.[0-9]+)?)(ns|us|ms|s|m|h)", text))
    return timedelta(seconds=seconds)


def _valid_duration(text: str) -> str:
    parse_duration(text)
    return text


def _positive_quantity(text: str) -> str:
    if float(re.sub(r"[KMGTPE]i$|[mkMGTPE]$", "", text) or 0) <= 0:
        raise ValueError(f"{text!r} must be greater than zero")
    return text


Duration = Annotated[str, StringConstraints(pattern=DURATION_PATTERN, max_length=64),
                     AfterValidator(_valid_duration), Field(json_schema_extra={"format": "duration"})]
Quantity = Annotated[str, StringConstraints(pattern=QUANTITY_PATTERN, max_length=64),
                     AfterValidator(_positive_quantity)]


def preserve_unknown(description: str, **extra: Any) -> Any:
    """A pass-through Kubernetes type (resources, tolerations...) the apiserver validates itself."""
    return Field(description=description, json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
                 **extra)


class KubeModel(BaseModel):
    """camelCase on the wire, snake_case in Python; unknown fields are an error, not silently dropped."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid",
                              use_attribute_docstrings=False)


class Condition(KubeModel):
    """The latest observation of one aspect of the object's state."""

    type: str = Field(description="Condition type, e.g. Ready.", max_length=64)
    status: ConditionStatus = Field(description="True, False or Unknown.")
    reason: str = Field(description="A stable CamelCase machine-readable reason.", max_length=128)
    message: str = Field("", description="A human-readable explanation.", max_length=4096)
    last_transition_time: datetime | None = Field(None, description="When status last changed.")
    observed_generation: int | None = Field(None, description="The spec generation this reflects.")


class ToolFilter(KubeModel):
    """Which tools of an MCP server an agent may call. An empty allow list allows all; deny wins."""

    allow: list[Annotated[str, StringConstraints(max_length=128)]] = Field(
        default_factory=list, max_length=256, description="Tool names to expose; empty means all.")
    deny: list[Annotated[str, StringConstraints(max_length=128)]] = Field(
        default_factory=list, max_length=256, description="Tool names to hide; wins over allow.")
