"""The privilege drop, run in a freshly forked child, and its verification.

The order follows SECURITY.md: a step that needs root (keyring, rlimits,
setgroups) happens before the uid changes, and nothing the user controls is
read until every step has been verified.  On any doubt the child exits with
status 127 before it touches user bytes.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import resource
import signal
from collections.abc import Iterable

from .users import TargetUser

DROP_FAILED = 127

_PR_SET_PDEATHSIG = 1
_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_DUMPABLE = 4
_KEYCTL_JOIN_SESSION_KEYRING = 1
_SYS_KEYCTL = {"x86_64": 250, "aarch64": 219, "armv7l": 311, "ppc64le": 280, "s390x": 280}

_libc = ctypes.CDLL(None, use_errno=True)

#: Variables a run sees besides the user's identity ones; never tokens.
ENV_ALLOWLIST = ("LANG", "LC_ALL", "LC_CTYPE", "TERM", "TZ")
SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"


class DropError(RuntimeError):
    """A step of the drop failed or could not be verified."""


def prctl(option: int, arg: int) -> None:
    if _libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise DropError(f"prctl({option}) failed: {os.strerror(err)}")


def new_session_keyring() -> None:
    """Join a fresh anonymous session keyring so root's keys are not possessed."""
    number = _SYS_KEYCTL.get(platform.machine())
    if number is None:
        raise DropError(f"keyctl syscall number unknown on {platform.machine()}")
    if _libc.syscall(number, _KEYCTL_JOIN_SESSION_KEYRING, None) < 0:
        err = ctypes.get_errno()
        # A kernel without keyrings, or a sandbox that forbids them, leaves no
        # keys to leak; anything else is a real failure.
        if err not in (errno.ENOSYS, errno.EPERM):
            raise DropError(f"could not join a new session keyring: {os.strerror(err)}")


def close_fds_except(keep: Iterable[int]) -> None:
    """Close every fd but ``keep``: close-on-exec does nothing without exec."""
    low = 0
    for fd in sorted(set(keep)):
        # os.closerange(n, n) is not a no-op on every Python: skip empty ranges.
        if low < fd:
            os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, os.sysconf("SC_OPEN_MAX"))


def apply_rlimits(rlimits: dict[str, int]) -> None:
    """Set soft and hard limits; never above an existing hard limit (non-root can't raise it)."""
    for name, value in rlimits.items():
        which = getattr(resource, name)
        limit = value if value > 0 or name == "RLIMIT_CORE" else resource.RLIM_INFINITY
        _, hard = resource.getrlimit(which)
        if hard != resource.RLIM_INFINITY and (limit == resource.RLIM_INFINITY or limit > hard):
            limit = hard
        resource.setrlimit(which, (limit, limit))


def clean_environment(target: TargetUser, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The run's environment, rebuilt from an allowlist plus the user's identity."""
    env = {key: os.environ[key] for key in ENV_ALLOWLIST if key in os.environ}
    env.update(
        HOME=target.home,
        USER=target.name,
        LOGNAME=target.name,
        SHELL=target.shell or "/bin/sh",
        PATH=SAFE_PATH,
    )
    env.setdefault("LANG", "C.UTF-8")
    if extra:
        env.update(extra)
    return env


def switch_user(target: TargetUser) -> None:
    """setgroups, setresgid, setresuid: groups first, all three ids each."""
    os.setgroups(list(target.groups))
    os.setresgid(target.gid, target.gid, target.gid)
    os.setresuid(target.uid, target.uid, target.uid)


def _can_regain(action) -> bool:
    try:
        action()
    except PermissionError:
        return False
    return True


def _capabilities_zero() -> bool:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(("CapEff:", "CapPrm:")) and int(line.split()[1], 16) != 0:
                return False
    return True


def verify(target: TargetUser, switched: bool) -> None:
    """Prove the drop: ids, groups and capabilities match, and root cannot be regained."""
    if os.getresuid() != (target.uid,) * 3 or os.getresgid() != (target.gid,) * 3:
        raise DropError(f"ids are {os.getresuid()}/{os.getresgid()}, not {target.uid}/{target.gid}")
    if switched:
        if sorted(set(os.getgroups())) != sorted(set(target.groups)):
            raise DropError(f"groups are {os.getgroups()}, not {list(target.groups)}")
        if target.uid != 0:
            if _can_regain(lambda: os.setuid(0)) or _can_regain(lambda: os.setgid(0)):
                raise DropError("setuid(0)/setgid(0) still succeed after the drop")
            if _can_regain(lambda: os.setgroups([0])):
                raise DropError("setgroups([0]) still succeeds after the drop")
            if not _capabilities_zero():
                raise DropError("capabilities remain after the drop")


def drop(
    target: TargetUser,
    *,
    keep_fds: Iterable[int],
    rlimits: dict[str, int],
    parent_pid: int,
) -> None:
    """Become ``target`` for good. Raises DropError (caller must ``_exit``)."""
    os.setsid()
    close_fds_except(keep_fds)
    switched = os.getuid() != target.uid or os.getuid() == 0
    if switched:
        new_session_keyring()
    apply_rlimits(rlimits)
    os.umask(0o022)
    if switched:
        switch_user(target)
    verify(target, switched)
    prctl(_PR_SET_NO_NEW_PRIVS, 1)
    prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:
        raise DropError("the fork server died during the drop")
    # Changing ids from root leaves the process non-dumpable: the user could not
    # read its own /proc/self/* or attach their own debugger. Its memory is the
    # fork server's image, which holds no secrets (jobs bypass the fork server),
    # so it becomes an ordinary process of the user. Core dumps stay off (rlimit).
    prctl(_PR_SET_DUMPABLE, 1)
