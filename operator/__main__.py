"""`python -m agentbox.operator`: the kopf operator with liveness, peering and JSON logs."""

import argparse
import sys

import kopf

from agentbox.operator.settings import OperatorSettings


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="agentbox-operator", description=__doc__)
    parser.add_argument("--peering", default="agentbox", help="peering name for active/standby HA")
    parser.add_argument("--standalone", action="store_true", help="run without peering")
    parser.add_argument("--priority", type=int, default=0, help="peering priority (higher wins)")
    parser.add_argument("--liveness", default="http://127.0.0.1:8081/healthz", help="liveness endpoint URL")
    parser.add_argument("-n", "--namespace", action="append", default=[],
                        help="namespace or glob to serve (repeatable); all namespaces when omitted")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    settings = OperatorSettings()
    level = settings.log_level.lower()
    # kopf's JSON formatter stamps every record with the object's identity (apiVersion, kind, ns, name).
    kopf.configure(log_format=kopf.LogFormat.JSON, log_refkey="object", debug=level == "debug",
                   quiet=level in ("warning", "error"))
    import agentbox.operator.handlers  # noqa: F401  (registers the handlers)

    # kopf makes peering mandatory whenever a name is given, so standalone runs pass none.
    kopf.run(standalone=args.standalone, priority=args.priority,
             peering_name=None if args.standalone else args.peering,
             liveness_endpoint=args.liveness, clusterwide=not args.namespace, namespaces=args.namespace)
    return 0


if __name__ == "__main__":
    sys.exit(main())
