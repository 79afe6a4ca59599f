"""Mint a Supabase-style HS256 JWT for local development and tests.

    python hack/mint_token.py --secret-file .dev/jwt-secret --issuer URL --sub ada@example.com \
        --org demo --role admin            # an org member (role admin or user)
    python hack/mint_token.py --secret-file .dev/jwt-secret --issuer URL --service-role
                                           # the platform operator (top-level role service_role)

Prints the token alone on stdout. The claims follow contract.md: org and role in `app_metadata`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import jwt


def claims(*, issuer: str, audience: str, sub: str, org: str | None, role: str | None,
           service_role: bool, ttl_seconds: int, now: int | None = None) -> dict[str, Any]:
    """The claim set the API expects: a service_role token carries no org, a member token needs one."""
    issued = int(time.time()) if now is None else now
    base: dict[str, Any] = {"iss": issuer, "aud": audience, "sub": sub, "iat": issued,
                            "exp": issued + ttl_seconds}
    if service_role:
        return {**base, "role": "service_role"}
    if not org or role not in ("admin", "user"):
        raise ValueError("a member token needs --org and --role admin|user (or pass --service-role)")
    return {**base, "role": "authenticated", "app_metadata": {"org_id": org, "role": role}}


def mint(secret: str, **kwargs: Any) -> str:
    return jwt.encode(claims(**kwargs), secret, algorithm="HS256")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hack/mint_token.py", description=__doc__.splitlines()[0])
    parser.add_argument("--secret-file", type=Path, required=True, help="file holding the HS256 secret")
    parser.add_argument("--issuer", required=True, help="the iss claim (AGENTBOX_JWT_ISSUER)")
    parser.add_argument("--audience", default="authenticated")
    parser.add_argument("--sub", default="platform", help="the subject (user id)")
    parser.add_argument("--org", help="app_metadata.org_id")
    parser.add_argument("--role", choices=["admin", "user"], help="app_metadata.role")
    parser.add_argument("--service-role", action="store_true", help="a platform-operator token")
    parser.add_argument("--ttl", type=int, default=12 * 3600, help="lifetime in seconds (default 12 h)")
    args = parser.parse_args(argv)
    try:
        secret = args.secret_file.read_text().strip()
    except OSError as error:
        parser.error(f"--secret-file {args.secret_file}: {error.strerror}")
    try:
        print(mint(secret, issuer=args.issuer, audience=args.audience, sub=args.sub, org=args.org,
                   role=args.role, service_role=args.service_role, ttl_seconds=args.ttl))
    except ValueError as error:
        parser.error(str(error))
    return 0


if __name__ == "__main__":
    sys.exit(main())
