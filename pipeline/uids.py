"""UID validation and deterministic derivation of result UIDs."""

from __future__ import annotations

import hashlib
import re

from pipeline.errors import InvalidUidError

UID_PATTERN = re.compile(r"^[0-9]+(\.[0-9]+)*$")
DEFAULT_UID_ROOT = "1.2.826.0.1.3680043.10.1561"


def is_valid_uid(uid: str) -> bool:
    """True when ``uid`` matches the DICOM UID grammar and is at most 64 characters.

    Components other than a lone ``0`` must not start with ``0``.
    """
    if not isinstance(uid, str) or not uid or len(uid) > 64 or not UID_PATTERN.match(uid):
        return False
    return all(part == "0" or not part.startswith("0") for part in uid.split("."))


def validate_uid(uid: str, what: str = "UID") -> str:
    """Return ``uid`` unchanged, or raise :class:`InvalidUidError` naming ``what``."""
    if not is_valid_uid(uid):
        shown = repr(uid)[:80]
        raise InvalidUidError(f"{what} {shown} is not a valid DICOM UID (digits and dots, <= 64 chars)")
    return uid


def derive_uid(root: str, *parts: str) -> str:
    """Derive a stable UID under ``root`` from ``parts``.

    The same parts always give the same UID, so re-running a study replaces
    its results instead of duplicating them.

    Parameters
    ----------
    root:
        Organisation UID root (validated), at most 40 characters.
    parts:
        Source UIDs, model version, output kind, ...
    """
    validate_uid(root, "UID root")
    if len(root) > 40:
        raise InvalidUidError(f"UID root {root!r} is longer than 40 characters")
    digest = hashlib.sha256("\x1f".join(parts).encode("utf-8")).digest()
    number = str(int.from_bytes(digest[:16], "big"))
    uid = f"{root}.{number}"[:64]
    return uid.rstrip(".")
