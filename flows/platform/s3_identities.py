"""SeaweedFS's S3 identities file: one admin identity with the platform's generated keys.

``python -m flows.platform.s3_identities`` prints it for the keys in ``AWS_ACCESS_KEY_ID`` and
``AWS_SECRET_ACCESS_KEY`` (the container recipe in ``infra/`` writes it so before ``weed server``).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

ACTIONS = ("Admin", "Read", "List", "Tagging", "Write")


def identities(access_key_id: str, secret_access_key: str, name: str = "aeflow") -> dict[str, Any]:
    """The ``-s3.config`` document granting one identity every action on every bucket."""
    return {"identities": [{"name": name, "credentials": [{"accessKey": access_key_id, "secretKey": secret_access_key}],
                            "actions": list(ACTIONS)}]}


def main() -> int:
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if not key or not secret:
        print("error: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY", file=sys.stderr)
        return 2
    json.dump(identities(key, secret), sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
