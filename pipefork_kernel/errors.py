"""Exceptions raised by pipefork.

Every error a caller can see derives from :class:`PipeforkError`, so a grader
or a server handler can catch one type and still tell the cases apart.  Each
message says what happened and what to do about it.
"""

from __future__ import annotations


class PipeforkError(Exception):
    """Base class for everything pipefork raises."""

    def _render_traceback_(self) -> list[str]:
        # In IPython the message is the whole story; pipefork's frames are noise.
        return [f"{type(self).__name__}: {self}"]


class PolicyError(PipeforkError):
    """The target user is refused: unknown, privileged, denied, or not allowed.

    Raised in the calling process before anything is forked.
    """


class UnknownUserError(PolicyError):
    """No account has this name."""


class CapacityError(PipeforkError):
    """The per-user limit of concurrent runs is reached; retry when one ends."""


class ForkServerError(PipeforkError):
    """The fork server could not be started or reached."""


class ProtocolError(PipeforkError):
    """A child sent bytes that are not a valid frame of the pipe protocol."""


class RunTimeout(PipeforkError):
    """A run went past its timeout and its process group was killed."""


class ChildCrashed(PipeforkError):
    """A run ended without a reply: killed by a signal or exited early."""


class RemoteError(PipeforkError):
    """The code run as the other user raised an exception.

    ``ename``, ``evalue`` and ``traceback`` describe the remote exception; the
    exception object itself never crosses the pipe (root does not unpickle what
    a child produced).
    """

    def __init__(self, ename: str, evalue: str, traceback: list[str], user: str):
        self.ename = ename
        self.evalue = evalue
        self.traceback = traceback
        self.user = user
        super().__init__(f"{ename}: {evalue} (raised while running as {user!r})")

    def __str__(self) -> str:
        lines = "\n".join(self.traceback)
        return f"{self.args[0]}\n{lines}" if lines else self.args[0]

    def _render_traceback_(self) -> list[str]:
        lines = [line.rstrip("\n") for line in self.traceback] or [f"{self.ename}: {self.evalue}"]
        if not any(self.user in line for line in lines[-1:]):
            lines.append(f"(raised while running as {self.user!r})")
        return lines


class ResultNotJSON(PipeforkError):
    """The function returned a value that cannot travel back as JSON."""
