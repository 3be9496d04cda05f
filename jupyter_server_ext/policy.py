"""Who may run as whom, decided from the identity Jupyter Server authenticated.

Nothing a client writes (request body, message headers) names the caller: the
identity comes from the server's IdentityProvider.  The engine's UserPolicy
(no root, ``min_uid``, allowed/denied users) applies on top of this.
"""

from __future__ import annotations

from dataclasses import dataclass

from jupyter_server.auth.identity import IdentityProvider, User
from traitlets import Bool, Dict, Enum, List, Unicode, Union
from traitlets import Callable as CallableTrait
from traitlets.config import LoggingConfigurable


@dataclass(frozen=True)
class Decision:
    allowed: bool
    rule: str
    reason: str


class RunPolicy(LoggingConfigurable):
    """Which authenticated identities may run code as which Unix users."""

    mode = Enum(
        ["owner", "admin"],
        default_value="owner",
        config=True,
        help="owner: an identity may run only as the Unix user it maps to (identity_to_user), "
        "and only for paths that user owns; admins may run as anyone the engine allows. "
        "admin: only admin identities may run anything.",
    )
    admin_identities = List(
        Unicode(),
        config=True,
        help="Identities (Jupyter Server usernames) that may run as any allowed user.",
    )
    identity_to_user = Union(
        [Dict(), CallableTrait()],
        default_value={},
        config=True,
        help="Maps an identity to its Unix user name: a dict, or a callable taking the "
        "identity (e.g. to strip a JupyterHub prefix). Unmapped identities map to themselves.",
    )
    token_holder_is_admin = Bool(
        True,
        config=True,
        help="With Jupyter Server's own token or password login there is one person, whoever "
        "holds the token: treat them as an admin. Has no effect with other IdentityProviders "
        "(e.g. JupyterHub's), whose identities are real people.",
    )

    def unix_name(self, identity: str) -> str:
        mapping = self.identity_to_user
        if isinstance(mapping, dict):
            return mapping.get(identity, identity)
        return str(mapping(identity))

    def is_admin(self, user: User, provider: IdentityProvider | None) -> bool:
        if user.username in self.admin_identities:
            return True
        single_user = provider is not None and type(provider).__module__.startswith("jupyter_server.")
        return self.token_holder_is_admin and single_user

    def decide(self, identity: str, admin: bool, target: str, path_owner: str | None) -> Decision:
        """May ``identity`` run as ``target`` (for a notebook owned by ``path_owner``)?"""
        if admin:
            return Decision(True, "admin", f"{identity!r} is an admin")
        if self.mode == "admin":
            return Decision(False, "mode=admin", "only admin identities may run code (RunPolicy.mode)")
        mapped = self.unix_name(identity)
        if target != mapped:
            where = " (the owner of that notebook)" if path_owner else ""
            return Decision(
                False,
                "owner",
                f"identity {identity!r} maps to Unix user {mapped!r} and may run only as that "
                f"user, not as {target!r}{where}",
            )
        return Decision(True, "owner", f"{identity!r} runs as its own user {mapped!r}")

    def describe(self) -> dict:
        mapping = self.identity_to_user
        return {
            "mode": self.mode,
            "admin_identities": list(self.admin_identities),
            "identity_to_user": dict(mapping) if isinstance(mapping, dict) else "callable",
            "token_holder_is_admin": self.token_holder_is_admin,
        }
