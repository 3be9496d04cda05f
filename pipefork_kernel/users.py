"""Who a run may become: resolution and policy, decided in the root parent.

Everything here runs before any fork.  A user spec is a *name*; numeric
strings are refused outright because "-1" and "4294967295" mean "leave the id
unchanged" to setresuid (sudo's CVE-2019-14287), and a uid typed by a client is
a spoof waiting to happen.
"""

from __future__ import annotations

import os
import pwd
import re
from dataclasses import asdict, dataclass

from traitlets import Bool, Int, List, Unicode, default
from traitlets.config import LoggingConfigurable

from .errors import PolicyError, UnknownUserError

#: POSIX portable user names (plus the common '$' suffix for machine accounts).
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,31}\$?$")


@dataclass(frozen=True)
class TargetUser:
    """A resolved account, with the group list computed by root."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str
    shell: str

    def to_json(self) -> dict:
        data = asdict(self)
        data["groups"] = list(self.groups)
        return data

    @classmethod
    def from_json(cls, data: dict) -> TargetUser:
        return cls(
            name=str(data["name"]),
            uid=int(data["uid"]),
            gid=int(data["gid"]),
            groups=tuple(int(g) for g in data["groups"]),
            home=str(data["home"]),
            shell=str(data["shell"]),
        )


class UserPolicy(LoggingConfigurable):
    """Which Unix users runs may become."""

    min_uid = Int(
        1000,
        config=True,
        help="Lowest uid a run may become. System accounts live below it.",
    )
    max_uid = Int(
        help="Highest uid a run may become (default: UID_MAX of /etc/login.defs, else 60000). "
        "Above it live nobody (65534) and other service accounts.",
    ).tag(config=True)
    allow_root = Bool(
        False,
        config=True,
        help="Allow runs as uid 0 or as members of group 0. Almost never what you want.",
    )
    allowed_users = List(
        Unicode(),
        config=True,
        help="If not empty, only these user names may be run as.",
    )
    denied_users = List(
        Unicode(),
        config=True,
        help="User names that may never be run as, whatever else allows them.",
    )

    @default("max_uid")
    def _default_max_uid(self) -> int:
        return login_defs_uid_max()

    def resolve(self, spec: object) -> TargetUser:
        """Resolve ``spec`` to an account this policy allows, or raise PolicyError."""
        name = self._check_spec(spec)
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            raise UnknownUserError(
                f"no such user {name!r}: create the account first, or check the spelling"
            ) from None
        groups = tuple(sorted(set(os.getgrouplist(entry.pw_name, entry.pw_gid))))
        target = TargetUser(
            name=entry.pw_name,
            uid=entry.pw_uid,
            gid=entry.pw_gid,
            groups=groups,
            home=entry.pw_dir,
            shell=entry.pw_shell,
        )
        self.check(target)
        return target

    def check(self, target: TargetUser) -> None:
        """Apply the id floor and the allow/deny lists to a resolved account."""
        if not self.allow_root:
            if target.uid == 0:
                raise PolicyError(f"refusing to run as {target.name!r}: it is uid 0 (root)")
            if target.gid == 0 or 0 in target.groups:
                raise PolicyError(
                    f"refusing to run as {target.name!r}: it is a member of group 0 (root); "
                    "remove it from that group or set UserPolicy.allow_root"
                )
        if target.uid < self.min_uid and not (self.allow_root and target.uid == 0):
            raise PolicyError(
                f"refusing to run as {target.name!r}: uid {target.uid} is below min_uid "
                f"{self.min_uid} (system account); lower UserPolicy.min_uid if this is intended"
            )
        if target.uid > self.max_uid and not (self.allow_root and target.uid == 0):
            raise PolicyError(
                f"refusing to run as {target.name!r}: uid {target.uid} is above max_uid "
                f"{self.max_uid} (a service account such as nobody); raise UserPolicy.max_uid "
                "if this is intended"
            )
        if target.name in self.denied_users:
            raise PolicyError(f"refusing to run as {target.name!r}: it is in denied_users")
        if self.allowed_users and target.name not in self.allowed_users:
            raise PolicyError(f"refusing to run as {target.name!r}: it is not in allowed_users")

    @staticmethod
    def _check_spec(spec: object) -> str:
        if not isinstance(spec, str):
            raise PolicyError(
                f"a user must be given as a name (str), not {type(spec).__name__}; "
                "numeric ids are refused on purpose"
            )
        if not spec:
            raise PolicyError("the user name is empty")
        if re.fullmatch(r"[+-]?\d+", spec.strip()):
            raise PolicyError(
                f"{spec!r} looks like a numeric id; give the account's name instead "
                "(numeric ids such as -1 or 4294967295 are refused on purpose)"
            )
        if not _NAME.match(spec):
            raise PolicyError(f"{spec!r} is not a valid user name")
        return spec


def login_defs_uid_max(path: str = "/etc/login.defs") -> int:
    """UID_MAX as the system's account tools see it: the top of the range for people."""
    try:
        with open(path) as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 2 and fields[0] == "UID_MAX" and fields[1].isdigit():
                    return int(fields[1])
    except OSError:
        pass
    return 60000


def current_user() -> TargetUser:
    """The account this process runs as, for same-user (non-root) runs."""
    uid = os.getuid()
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        raise PolicyError(f"this process runs as uid {uid}, which has no passwd entry") from None
    groups = tuple(sorted(set(os.getgroups()) | {os.getgid()}))
    return TargetUser(entry.pw_name, uid, os.getgid(), groups, entry.pw_dir, entry.pw_shell)
