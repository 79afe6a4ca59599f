"""Model provider API keys: sealed per org or per user in `provider_keys`, rendered one Secret each into the
org's tenant namespace, and resolved for a session (the user's own key wins over the org's).

    Secret agentbox-provider-key-org-<provider>        the org's key, under `api-key`
    Secret agentbox-provider-key-u<hash>-<provider>    a user's key (the hash of the user id)

Each carries the label agentbox.dev/provider-key=<org|user>: an object of that name without it is
somebody else's and is never overwritten or deleted. A session references its Secret in
spec.egress.providerKey; the operator copies the key into the session Secret as an item that only the
egress proxy mounts.
"""

from __future__ import annotations

import hashlib
import uuid

import asyncpg

from agentbox.api.crypto import CipherContext
from agentbox.api.kube import user_label
from agentbox.crds.naming import ORG_LABEL, USER_LABEL
from agentbox.crds.providers import Provider

TABLE = "provider_keys"
COLUMN = "key_enc"
SECRET_KEY = "api-key"  # noqa: S105 (a key name inside the Secret)
SCOPE_LABEL = "agentbox.dev/provider-key"


def secret_name(user: str | None, provider: Provider) -> str:
    """The Secret of the org's key (`user` None) or of one user's key."""
    owner = "org" if user is None else f"u{hashlib.sha256(user.encode()).hexdigest()[:16]}"
    return f"agentbox-provider-key-{owner}-{provider}"


def labels(org: str, user: str | None) -> dict[str, str]:
    scoped = {ORG_LABEL: org, SCOPE_LABEL: "org" if user is None else "user"}
    return scoped if user is None else {**scoped, USER_LABEL: user_label(user)}


def cipher(org: str, row_id: uuid.UUID) -> CipherContext:
    return CipherContext(org_id=org, table=TABLE, row_id=str(row_id), column=COLUMN)


async def resolve(conn: asyncpg.Connection, user: str, provider: Provider) -> dict[str, str] | None:
    """The Secret key selector of the key a session of `user` uses for `provider`: the user's own, else the
    org's; None when neither is stored. Reads no ciphertext: the Secret holds the key already."""
    owner = await conn.fetchrow(
        "SELECT user_id FROM provider_keys WHERE provider = $1 AND (user_id = $2 OR user_id IS NULL) "
        "ORDER BY user_id NULLS LAST LIMIT 1", provider, user)
    return None if owner is None else {"name": secret_name(owner["user_id"], provider), "key": SECRET_KEY}
