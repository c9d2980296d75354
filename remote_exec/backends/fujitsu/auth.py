"""Authenticating WebAPI requests: one small interface, two schemes.

``bearer``  ``Authorization: Bearer <token>``;
``hmac``    an access key and a secret key: the access key, a timestamp (unix seconds)
            and ``hex(HMAC-SHA256(secret, string_to_sign))`` in three headers whose names,
            like the string to sign, the site may set as its provider documents them.
            The default string to sign is ``METHOD\\nPATH\\nTIMESTAMP\\nSHA256HEX(body)``
            (``PATH`` as sent, without the query string).

Credentials come from the environment (``REMOTE_EXEC_FUJITSU_TOKEN``, or
``REMOTE_EXEC_FUJITSU_ACCESS_KEY`` and ``REMOTE_EXEC_FUJITSU_SECRET_KEY``) or from the
site's ``credentials_file`` (``KEY=VALUE`` lines with the same names, mode 0600). They are
registered with :mod:`remote_exec.redact` as soon as they are read, and no object here
shows them in its ``repr``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from remote_exec import redact
from remote_exec.backends.fujitsu.settings import FujitsuSettings
from remote_exec.errors import AuthError
from remote_exec.paths import read_private

ENV_TOKEN = "REMOTE_EXEC_FUJITSU_TOKEN"  # noqa: S105 - a variable name
ENV_ACCESS_KEY = "REMOTE_EXEC_FUJITSU_ACCESS_KEY"
ENV_SECRET_KEY = "REMOTE_EXEC_FUJITSU_SECRET_KEY"  # noqa: S105 - a variable name


class Auth(Protocol):
    def headers(self, method: str, path: str, body: bytes) -> dict[str, str]:
        """The headers that authenticate one request."""


@dataclass
class BearerAuth:
    token: str = field(repr=False)

    def headers(self, method: str, path: str, body: bytes) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


@dataclass
class HmacAuth:
    access_key: str = field(repr=False)
    secret_key: str = field(repr=False)
    access_key_header: str = "X-Access-Key"
    timestamp_header: str = "X-Timestamp"
    signature_header: str = "X-Signature"
    string_to_sign: str = "{method}\n{path}\n{timestamp}\n{body_sha256}"

    def headers(self, method: str, path: str, body: bytes) -> dict[str, str]:
        timestamp = str(int(time.time()))
        text = self.string_to_sign.replace("\\n", "\n").format(
            method=method.upper(), path=path, timestamp=timestamp,
            body_sha256=hashlib.sha256(body or b"").hexdigest())
        signature = hmac.new(self.secret_key.encode(), text.encode(),
                             hashlib.sha256).hexdigest()
        return {self.access_key_header: self.access_key, self.timestamp_header: timestamp,
                self.signature_header: signature}


def load_auth(settings: FujitsuSettings, site: str) -> Auth:
    """The site's scheme with its credentials (environment first, then the file)."""
    values = _from_file(settings.credentials_file, site) if settings.credentials_file else {}
    values.update({k: v for k, v in os.environ.items()
                   if k in (ENV_TOKEN, ENV_ACCESS_KEY, ENV_SECRET_KEY) and v})
    redact.register(*values.values())
    if settings.auth == "bearer":
        token = values.get(ENV_TOKEN)
        if not token:
            raise AuthError(f"no WebAPI token for site {site!r}",
                            hint=f"set {ENV_TOKEN} or put it in the site's credentials_file")
        return BearerAuth(token)
    access, secret = values.get(ENV_ACCESS_KEY), values.get(ENV_SECRET_KEY)
    if not access or not secret:
        raise AuthError(f"no WebAPI access key and secret key for site {site!r}",
                        hint=f"set {ENV_ACCESS_KEY} and {ENV_SECRET_KEY}, or put them in "
                        "the site's credentials_file (mode 0600)")
    return HmacAuth(access, secret, **{k: v for k, v in settings.hmac.items()})


def _from_file(path_text: str, site: str) -> dict[str, str]:
    path = Path(path_text).expanduser()
    values: dict[str, str] = {}
    for line in read_private(path, f"credentials file of site {site!r}").splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        values[key.strip().removeprefix("export ").strip()] = value.strip().strip("'\"")
    return values
