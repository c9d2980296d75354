"""One exception hierarchy; each error carries a message a user can act on, an exit code,
and what it means for the run (its ``disposition``), defined once per class:

* ``TRANSIENT`` — worth another try at once, within the step's bounded retries (a
  handshake sshd dropped, a channel refused by MaxSessions); past the retries the run
  is interrupted (:class:`LinkLostError`);
* ``RESUMABLE`` — the run stops but is not over: the journal records it *interrupted*,
  remote-exec exits 75, and ``remote-exec resume`` continues it;
* ``FINAL`` — the run is recorded *failed* with the class's exit code. ``resume`` still
  accepts a failed run whose entrypoint had finished (only the fetch is left to do).

A policy refusal (authentication, a restricted site's agent) is ``FINAL`` and never a
network fault: retrying cannot change the answer.

Exit codes (documented in the README). The entrypoint's own exit code is passed
through unchanged when the remote program fails, so these are chosen from the
``sysexits.h`` range that solvers rarely use.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_USAGE = 2  # click's own code for bad arguments
EXIT_INPUT = 66  # EX_NOINPUT: a declared input is missing, unreadable or clashes
EXIT_CONNECT = 69  # EX_UNAVAILABLE: host unknown, unreachable, refused, dropped
EXIT_INTERNAL = 70  # EX_SOFTWARE: a bug in remote-exec
EXIT_STAGE = 73  # EX_CANTCREAT: the remote run directory or staging failed
EXIT_FETCH = 74  # EX_IOERR: pulling results back failed
EXIT_AUTH = 77  # EX_NOPERM: authentication failed, host key not trusted, or the site refused
EXIT_CONFIG = 78  # EX_CONFIG: configuration or template error
EXIT_REMOTE_LOST = 75  # EX_TEMPFAIL: the outcome could not be read yet; `resume` may finish it
EXIT_TIMEOUT = 124  # as timeout(1): the run exceeded --timeout and was stopped
EXIT_SIGNAL_BASE = 128  # cancelled by a signal: 128 + its number (130 SIGINT, 143 SIGTERM)

TRANSIENT = "transient"
RESUMABLE = "resumable"
FINAL = "final"

#: the journal state a run ends in, by the disposition of the error that ended it
JOURNAL_STATE = {TRANSIENT: "interrupted", RESUMABLE: "interrupted", FINAL: "failed"}


class RemoteExecError(Exception):
    """Base of every expected failure. ``str(err)`` is the message for the user."""

    exit_code = EXIT_INTERNAL
    disposition = FINAL

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    @property
    def journal_state(self) -> str:
        """The state the engine records for a run this error ended."""
        return JOURNAL_STATE[self.disposition]

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message}\n  hint: {self.hint}"
        return self.message


class ConfigError(RemoteExecError):
    """The site configuration, a template or a parameter is wrong."""

    exit_code = EXIT_CONFIG


class InputError(RemoteExecError):
    """A declared input cannot be staged (missing, unreadable, name clash)."""

    exit_code = EXIT_INPUT


class ConnectError(RemoteExecError):
    """The host cannot be reached or the connection dropped.

    ``retryable`` marks drops worth another try at once, such as sshd closing
    connections beyond MaxStartups before authentication (their disposition is
    ``TRANSIENT``); an unknown host or a refused port is not (``FINAL``).
    """

    exit_code = EXIT_CONNECT

    def __init__(self, message: str, *, hint: str | None = None, retryable: bool = False) -> None:
        super().__init__(message, hint=hint)
        self.retryable = retryable

    @property  # type: ignore[override]
    def disposition(self) -> str:
        return TRANSIENT if self.retryable else FINAL


class ChannelRefusedError(ConnectError):
    """The connection is fine but sshd refused a new channel on it (MaxSessions reached,
    e.g. by other runs sharing it): wait and open the channel again; the connection is
    kept for the runs that use it."""

    HINT = ("sshd limits sessions per connection (MaxSessions); other runs may share this "
            "connection: the channel is opened again when one is free")

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message, hint=hint or self.HINT, retryable=True)


class AuthError(RemoteExecError):
    """Authentication failed or the host key could not be verified."""

    exit_code = EXIT_AUTH


class SftpRefusedError(AuthError):
    """The host accepted the connection but refused an SFTP session on it: its policy
    (a restricted site's key runs only the remote-exec agent) or its sshd (no SFTP
    subsystem). Not a network fault: asking again gets the same answer."""


class StageError(RemoteExecError):
    """Creating the remote run directory or copying inputs into it failed."""

    exit_code = EXIT_STAGE


class NoisyShellError(StageError):
    """The remote login shell prints in non-interactive sessions and nothing could carry
    the run past that text (see :mod:`remote_exec.ssh.shell`)."""


class FetchError(RemoteExecError):
    """Copying results back failed; the remote directory is kept."""

    exit_code = EXIT_FETCH


class RemoteLostError(RemoteExecError):
    """The entrypoint ran but its outcome could not be read back (yet): the run is
    interrupted and ``resume`` asks again."""

    exit_code = EXIT_REMOTE_LOST
    disposition = RESUMABLE


class LinkLostError(RemoteExecError):
    """The connection dropped and could not be reopened within the retry budget.

    The run is recorded as interrupted: ``remote-exec resume`` continues it.
    """

    exit_code = EXIT_REMOTE_LOST
    disposition = RESUMABLE


class RunBusyError(RemoteExecError):
    """Another remote-exec process is driving this run right now (its journal record is
    left to that process; ``resume`` may be tried again once it stops)."""

    exit_code = EXIT_REMOTE_LOST
    disposition = RESUMABLE


class RunCancelled(RemoteExecError):
    """The run was cancelled (a signal, ``remote-exec cancel``, or --timeout); the engine
    records it *cancelled* or *timed out* itself, not by this class's disposition."""

    def __init__(self, message: str, *, exit_code: int = 130, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.exit_code = exit_code
