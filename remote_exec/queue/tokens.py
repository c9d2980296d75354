"""Bearer tokens of the queue server: ``re1_`` + 43 base64url characters (32 random
bytes). The server keeps only their sha256 (hex); the token itself is shown once, by
``remote-exec queue token add``. A token's id, as listed and revoked, is the first 12
hex characters of its hash.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets

PREFIX = "re1_"
TOKEN_RE = re.compile(r"^re1_[A-Za-z0-9_-]{43}$")
ID_LENGTH = 12


def new_token() -> str:
    """A fresh random token."""
    raw = base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode("ascii")
    return PREFIX + raw


def token_hash(token: str) -> str:
    """The sha256 (hex) the server stores for ``token``."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def looks_like_token(text: str) -> bool:
    return bool(TOKEN_RE.match(text))
