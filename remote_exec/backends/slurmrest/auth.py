"""Authenticating requests to a Slurm REST API.

``jwt`` (slurmrestd's ``rest_auth/jwt``): the headers ``X-SLURM-USER-NAME`` and
``X-SLURM-USER-TOKEN``. The token comes from, in this order, the site's ``token_command``
(run over the site's SSH connection, e.g. ``scontrol token lifespan=3600``: it prints
``SLURM_JWT=...``), its ``token_file`` (mode 0600), or the environment's ``SLURM_JWT``.
Its expiry is read from the token itself (the ``exp`` claim; nothing is verified here,
slurmctld does that), so a token is renewed *before* it expires: slurmrestd answers an
expired one with an undistinguished HTTP 500. A token from a file or the environment
cannot be renewed: its expiry is an authentication error that says how to make a new one.

``negotiate`` (Kerberos SPNEGO, the FRCE API): on a ``401`` with
``WWW-Authenticate: Negotiate``, a token for ``HTTP@<host>`` from the user's ticket cache
through python-gssapi (the optional extra ``remote-exec[frce]``).

Tokens are registered with :mod:`remote_exec.redact` as soon as they are read and never
appear in a ``repr``, a message or a log line.
"""

from __future__ import annotations

import base64
import json
import os
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from remote_exec import redact
from remote_exec.backends.slurmrest.settings import SlurmRestSettings, read_secret_file
from remote_exec.errors import AuthError, ConfigError

#: the environment variable Slurm's own tools read a token from
ENV_TOKEN = "SLURM_JWT"  # noqa: S105 - a variable name
#: a token is renewed when less than this part of its life, or a minute, is left
RENEW_FRACTION = 0.5
RENEW_SECONDS = 60.0

#: runs an argument vector over the site's SSH connection and returns its stdout
RunRemote = Callable[[list[str]], Awaitable[str]]


def jwt_times(token: str) -> tuple[float | None, float | None]:
    """The ``iat`` and ``exp`` claims of a JWT (None where absent or unreadable)."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError, TypeError):
        return None, None
    if not isinstance(claims, dict):
        return None, None
    times = []
    for key in ("iat", "exp"):
        value = claims.get(key)
        times.append(float(value) if isinstance(value, (int, float)) else None)
    return times[0], times[1]


def token_from_output(text: str) -> str:
    """The token in what a token command printed: ``SLURM_JWT=eyJ...`` or the bare token."""
    for line in text.splitlines():
        line = line.strip()
        if line.startswith(f"{ENV_TOKEN}="):
            return line.split("=", 1)[1].strip()
        if line.count(".") == 2 and " " not in line:
            return line
    return ""


@dataclass
class JwtAuth:
    """slurmrestd's JWT headers, renewed before the token expires."""

    settings: SlurmRestSettings
    user: str
    site: str
    run_remote: RunRemote | None = None
    token: str = field(default="", repr=False)
    expires: float | None = None
    lifespan: float | None = None

    def renewable(self) -> bool:
        return bool(self.settings.token_command)

    def challenged(self, www_authenticate: str) -> bool:
        return False  # a 401 means the headers were missing or malformed

    def due(self, now: float | None = None) -> bool:
        """Whether the token must be (re)loaded before the next request."""
        if not self.token:
            return True
        if self.expires is None:
            return False
        left = self.expires - (now if now is not None else time.time())
        margin = min(RENEW_SECONDS, (self.lifespan or RENEW_SECONDS * 2) * RENEW_FRACTION)
        return left < margin

    async def headers(self, renew: bool = False) -> dict[str, str]:
        if renew or self.due():
            await self.load()
        return {"X-SLURM-USER-NAME": self.user, "X-SLURM-USER-TOKEN": self.token}

    async def load(self) -> None:
        settings = self.settings
        if settings.token_command:
            if self.run_remote is None:
                raise ConfigError("the site's token_command needs its SSH connection")
            output = await self.run_remote(list(settings.token_command))
            token = token_from_output(output)
            if not token:
                raise AuthError(f"the token command of site {self.site!r} printed no token",
                                hint="it must print SLURM_JWT=<token> (as `scontrol token` "
                                "does): is JWT enabled on the cluster (AuthAltTypes=auth/jwt)?")
            source = "token_command"
        elif settings.token_file:
            token, source = read_secret_file(settings.token_file, "Slurm token file"), \
                f"token file {settings.token_file}"
        elif os.environ.get(ENV_TOKEN):
            token, source = os.environ[ENV_TOKEN].strip(), f"${ENV_TOKEN}"
        else:
            raise AuthError(f"no Slurm token for site {self.site!r}",
                            hint="set the site's slurmrest.token_command (e.g. [scontrol, "
                            "token, lifespan=3600]) or token_file, or export SLURM_JWT")
        redact.register(token)
        issued, expires = jwt_times(token)
        if expires is not None and expires <= time.time():
            raise AuthError(f"the Slurm token from the site's {source} expired at "
                            f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(expires))}",
                            hint="make a new one (`scontrol token lifespan=86400` on the "
                            "cluster) or set slurmrest.token_command so that remote-exec "
                            "renews it itself")
        self.token, self.expires = token, expires
        self.lifespan = (expires - issued) if expires and issued else None

    def expiry_text(self) -> str:
        if self.expires is None:
            return "no expiry in the token"
        left = self.expires - time.time()
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.expires))
        renew = "renewed by token_command" if self.renewable() else "not renewable"
        return f"expires {when} (in {int(left // 60)} min; {renew})"


@dataclass
class NegotiateAuth:
    """Kerberos SPNEGO: nothing until the API challenges (``401`` with
    ``WWW-Authenticate: Negotiate``), then a token for the API's host."""

    url: str
    header: str = field(default="", repr=False)

    async def headers(self, renew: bool = False) -> dict[str, str]:
        return {"Authorization": self.header} if self.header else {}

    def challenged(self, www_authenticate: str) -> bool:
        """Answer a 401's challenge; False if it is not one this scheme answers (or
        it was answered already: the credentials were refused)."""
        if self.header or not www_authenticate.lower().startswith("negotiate"):
            return False
        token = negotiate_token(self.url)
        redact.register(token)
        self.header = f"Negotiate {token}"
        return True


def negotiate_token(url: str) -> str:
    """A base64 SPNEGO token for ``HTTP@host`` from the user's Kerberos credentials."""
    try:
        import gssapi  # type: ignore[import-not-found]
    except ImportError:
        raise AuthError("the API asks for Kerberos (Negotiate) and python-gssapi is not "
                        "installed", hint="pip install 'remote-exec[frce]' (and kinit)") \
            from None
    host = urllib.parse.urlsplit(url).hostname or ""
    try:
        name = gssapi.Name(f"HTTP@{host}", gssapi.NameType.hostbased_service)
        context = gssapi.SecurityContext(name=name, usage="initiate")
        token = context.step()
    except Exception as exc:  # noqa: BLE001 - gssapi's errors carry the Kerberos reason
        raise AuthError(f"no Kerberos ticket for HTTP@{host}: {exc}",
                        hint="run kinit (klist shows your tickets)") from None
    return base64.b64encode(token or b"").decode("ascii")


@dataclass
class NoAuth:
    async def headers(self, renew: bool = False) -> dict[str, str]:
        return {}

    def challenged(self, www_authenticate: str) -> bool:
        return False
