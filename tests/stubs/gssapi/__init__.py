"""A stand-in for python-gssapi, for tests only: it makes a fixed SPNEGO-shaped token
without Kerberos, so the ``negotiate`` client path (401 challenge, token, retry) runs
against the FRCE simulator (which accepts any token). Put this directory on PYTHONPATH.
A real KDC is not started by the tests."""

CALLS = []


class NameType:
    hostbased_service = "hostbased_service"


class Name:
    def __init__(self, text, name_type=None):
        self.text = text
        CALLS.append(text)


class SecurityContext:
    def __init__(self, name=None, usage=None):
        self.name = name

    def step(self, token=None):
        return b"\x60\x28stub-spnego-token-for-" + self.name.text.encode()
