"""Deterministic UIDs.

``pydicom.uid.generate_uid(prefix=None, ...)`` ignores ``entropy_srcs`` and
returns a random UUID-derived UID, so we derive our own: a name-based UUID
(RFC 9562 version 5 style, SHA-1 of the parts) under the ``2.25`` root
(PS3.5 B.2), which needs no registered organisation root.
"""

from __future__ import annotations

import uuid

_NAMESPACE = uuid.UUID("6f1f3c1e-5d0e-4b8a-9a57-4f7262746861")


def derived_uid(*parts: str) -> str:
    """Same parts, same UID; different parts, a different UID (with 2^-122 odds)."""
    if not parts:
        raise ValueError("at least one part is required")
    name = "\x1f".join(str(p) for p in parts)
    return f"2.25.{uuid.uuid5(_NAMESPACE, name).int}"
