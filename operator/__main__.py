"""`python -m agentbox.operator`: the kopf operator with liveness, peering and JSON logs."""

import argparse
import secrets
import sys
import time

import kopf

from agentbox.operator.settings import OperatorSettings


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="agentbox-operator", description=__doc__)
    parser.add_argument("--peering", default="agentbox", help="peering name for active/standby HA")
    parser.add_argument("--standalone", action="store_true", help="run without peering")
    parser.add_argument("--priority", type=int, default=None,
                        help="peering priority (higher wins); default: ranked by start time, below 0")
    parser.add_argument("--liveness", default="http://127.0.0.1:8081/healthz", help="liveness endpoint URL")
    parser.add_argument("-n", "--namespace", action="append", default=[],
                        help="namespace or glob to serve (repeatable); all namespaces when omitted")
    return parser.parse_args(argv)


def start_priority() -> int:
    """A peering priority of this replica's own: kopf pauses every replica that sees a live peer of equal
    priority, so replicas started alike (a Deployment's) all paused and none reconciled. Ranked by start
    time rather than at random: a replica that starts later (a rollout, a restart) waits as the standby
    instead of taking over from one mid-work; the random part tells apart replicas started in the same
    millisecond. Always negative, so an operator given an explicit priority (0 or more) outranks them.
    (kopf's peering rather than a Lease: it is built in and already pauses and resumes kopf's watchers.)"""
    return -(time.time_ns() // 1_000_000 * 1000 + secrets.randbelow(1000))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    settings = OperatorSettings()
    level = settings.log_level.lower()
    # kopf's JSON formatter stamps every record with the object's identity (apiVersion, kind, ns, name).
    kopf.configure(log_format=kopf.LogFormat.JSON, log_refkey="object", debug=level == "debug",
                   quiet=level in ("warning", "error"))
    import agentbox.operator.handlers  # noqa: F401  (registers the handlers)

    # kopf makes peering mandatory whenever a name is given, so standalone runs pass none.
    priority = start_priority() if args.priority is None else args.priority
    kopf.run(standalone=args.standalone, priority=priority,
             peering_name=None if args.standalone else args.peering,
             liveness_endpoint=args.liveness, clusterwide=not args.namespace, namespaces=args.namespace,
             memo=kopf.Memo(namespaces=args.namespace))  # the cluster pools keep pools where it serves
    return 0


if __name__ == "__main__":
    sys.exit(main())
