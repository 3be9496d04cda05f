"""The root-launched broker: settings, the shared engine, and who runs as whom.

At start-up it spawns the fork server (by exec, before any user request) that
both the REST API and owner kernels use, installs the kernel-access check into
the server's authorizer, and registers its audit event schema.  On shutdown it
stops the fork server, which kills every run still going.
"""

from __future__ import annotations

import collections
import os
import pwd
import time
from dataclasses import dataclass, field
from typing import Any

from jupyter_server.extension.application import ExtensionApp
from tornado.web import HTTPError
from traitlets import Float, Int, Unicode

import pipefork_kernel
from pipefork_kernel import Engine, PipeforkError, PolicyError, UnknownUserError
from pipefork_kernel.users import TargetUser

from .access import RootServerAuthorizer
from .audit import AuditLog
from .policy import Decision, RunPolicy


@dataclass
class RunRecord:
    identity: str
    user: str
    kind: str
    started: float = field(default_factory=time.time)


class PipeforkApp(ExtensionApp):
    """pipefork's Jupyter Server extension."""

    name = "pipefork"
    load_other_extensions = True

    default_timeout = Float(60.0, config=True, help="Seconds a REST run may take when it asks for none.")
    max_timeout = Float(
        3600.0, config=True, help="Largest timeout a REST request may ask for; larger ones get 400."
    )
    max_request_bytes = Int(
        16 * 1024 * 1024, config=True, help="Largest request body accepted by the runs API (413 above)."
    )
    audit_log_path = Unicode(
        "",
        config=True,
        help="If set, every audit record is also appended to this JSON-lines file (mode 0600).",
    )

    def initialize_settings(self) -> None:
        self.engine = Engine(parent=self, config=self.config)
        self.engine.forkserver.start()
        pipefork_kernel.set_engine(self.engine)
        self.run_policy = RunPolicy(parent=self, config=self.config)
        self.audit = AuditLog(self.serverapp.event_logger, self.audit_log_path)
        self.active: dict[int, RunRecord] = {}
        self.done_by_status: collections.Counter[str] = collections.Counter()
        self.settings["authorizer"] = RootServerAuthorizer(
            parent=self.serverapp, wrapped=self.serverapp.authorizer, pipefork=self
        )
        self.log.info("pipefork: fork server %s started", self.engine.forkserver.pid)

    def initialize_handlers(self) -> None:
        from .handlers import RunsHandler, StatusHandler, WhoamiHandler

        self.handlers.extend(
            [
                (r"/pipefork/api/runs", RunsHandler),
                (r"/pipefork/api/status", StatusHandler),
                (r"/pipefork/api/whoami", WhoamiHandler),
            ]
        )

    async def stop_extension(self) -> None:
        self.engine.close()

    # --- who runs as whom ---------------------------------------------------------

    def is_admin(self, user: Any) -> bool:
        return self.run_policy.is_admin(user, self.serverapp.identity_provider)

    def notebook_owner(self, api_path: str) -> tuple[str, str]:
        """(real path, owner name) of a path inside root_dir; HTTPError otherwise."""
        root = os.path.realpath(self.serverapp.root_dir)
        real = os.path.realpath(os.path.join(root, api_path.lstrip("/")))
        if real != root and not real.startswith(root + os.sep):
            raise HTTPError(403, f"{api_path!r} resolves outside the server's root_dir; refused")
        if not os.path.exists(real):
            raise HTTPError(404, f"no such file or directory: {api_path!r}")
        uid = os.stat(real).st_uid
        try:
            return real, pwd.getpwuid(uid).pw_name
        except KeyError:
            raise HTTPError(403, f"{api_path!r} is owned by uid {uid}, which has no account") from None

    def resolve_target(self, user: Any, path: str | None, name: str | None) -> tuple[TargetUser, Decision]:
        """The target of a request from ``user`` (authenticated), or the HTTP error to answer."""
        owner = None
        if path is not None:
            _, owner = self.notebook_owner(path)
            name = owner
        assert name is not None
        admin = self.is_admin(user)
        if not admin:
            # Decide on the name first: a refusal must not tell whether the account exists.
            early = self.run_policy.decide(user.username, admin, name, owner)
            if not early.allowed:
                raise HTTPError(403, f"refused by rule {early.rule!r}: {early.reason}")
        try:
            target = self.engine.resolve(name)
        except UnknownUserError as exc:
            raise HTTPError(404, str(exc)) from None
        except PolicyError as exc:
            if os.geteuid() != 0:
                me = pwd.getpwuid(os.geteuid()).pw_name
                raise HTTPError(
                    403, f"this Jupyter server runs as {me!r}, not root, so it can run code only as {me!r}"
                ) from None
            raise HTTPError(403, str(exc)) from None
        decision = self.run_policy.decide(user.username, admin, target.name, owner)
        if not decision.allowed:
            raise HTTPError(403, f"refused by rule {decision.rule!r}: {decision.reason}")
        return target, decision

    def status(self) -> dict[str, Any]:
        """The status report; safe off the event loop's thread.

        The handler calls it in a worker thread (the fork server query blocks)
        while the loop adds and ends runs: take the run tables in one step each
        (list()/dict() of a dict do not let other threads in), then work on the
        copies.
        """
        active = list(self.active.values())
        by_status = dict(self.done_by_status)
        forkserver = self.engine.forkserver
        report: dict[str, Any] = {"running": forkserver.running(), "pid": forkserver.pid}
        if forkserver.running():
            try:
                details = forkserver.status()
            except PipeforkError as exc:
                report.update(running=False, error=str(exc))
            else:
                report.update({k: v for k, v in details.items() if k not in ("type", "pid", "preloaded")})
        report["restarts"] = forkserver.restarts
        now = time.time()
        user_policy = self.engine.policy
        return {
            "forkserver": report,
            "runs": {
                "active": [
                    {"identity": r.identity, "user": r.user, "kind": r.kind, "seconds": now - r.started}
                    for r in active
                ],
                "done": sum(by_status.values()),
                "by_status": by_status,
            },
            "policy": {
                **self.run_policy.describe(),
                "min_uid": user_policy.min_uid,
                "allow_root": user_policy.allow_root,
                "allowed_users": list(user_policy.allowed_users),
                "denied_users": list(user_policy.denied_users),
                "max_runs_per_user": forkserver.max_runs_per_user,
                "default_timeout": self.default_timeout,
                "max_timeout": self.max_timeout,
                "max_request_bytes": self.max_request_bytes,
            },
        }
