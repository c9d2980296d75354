"""One word for any remote login shell: the quoting rule, in a module light enough for
the command line's own checks (no asyncssh)."""

from __future__ import annotations

import shlex

from remote_exec.errors import ConfigError


def quote(word: str) -> str:
    """``word`` as one word for sh, bash, dash, zsh, csh and tcsh alike.

    POSIX single quotes, with ``!`` written ``'\\!'`` outside them (csh expands
    ``!`` inside single quotes; every shell reads ``\\!`` as ``!``). A newline has
    no spelling that csh and sh share, so it is refused.
    """
    if "\n" in word or "\r" in word:
        raise ConfigError(
            f"cannot pass {word!r} to a remote login shell: it holds a line break",
            hint="remove line breaks from the site's paths and parameters",
        )
    return shlex.quote(word).replace("!", "'\\!'")
