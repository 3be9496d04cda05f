"""Owner kernels obey the same policy as runs: checked where Jupyter authorizes.

Jupyter Server does not tell a kernel provisioner who asked for the kernel, so
the check sits in the authorizer, which sees both the identity and the
request: starting a session or kernel with a pipefork kernelspec, and any use
of an existing pipefork kernel (websocket, interrupt, restart, delete), is
allowed only when the identity may run as the kernel's owner.
"""

from __future__ import annotations

import inspect
import json
import os
import time
from typing import Any

from jupyter_server.auth.authorizer import Authorizer
from tornado.web import HTTPError
from traitlets import Any as AnyTrait

from pipefork_kernel.provisioner import PipeforkProvisioner

PROVISIONER_NAME = "pipefork-provisioner"


class KernelAccessAuthorizer(Authorizer):
    """Wraps the server's authorizer and adds the pipefork owner check for kernels."""

    wrapped = AnyTrait(help="The authorizer that decides everything else.")
    pipefork = AnyTrait(help="The PipeforkApp whose policy applies.")

    async def is_authorized(self, handler: Any, user: Any, action: str, resource: str) -> bool:
        allowed = self.wrapped.is_authorized(handler, user, action, resource)
        if inspect.isawaitable(allowed):
            allowed = await allowed
        if not allowed or resource not in ("kernels", "sessions"):
            return allowed
        owner, path = self._kernel_owner(handler, resource)
        if owner is None:
            return True
        app = self.pipefork
        decision = app.run_policy.decide(user.username, app.is_admin(user), owner, owner)
        if handler.request.method == "POST" and "kernel_id" not in handler.path_kwargs:
            app.audit.record(
                identity=user.username,
                user=owner,
                uid=None,
                path=path,
                kind="kernel",
                sha256=None,
                start=time.time(),
                duration=0.0,
                status="started" if decision.allowed else "refused",
                reason=None if decision.allowed else decision.reason,
            )
        if not decision.allowed:
            raise HTTPError(403, f"pipefork kernel refused by rule {decision.rule!r}: {decision.reason}")
        return True

    def _kernel_owner(self, handler: Any, resource: str) -> tuple[str | None, str | None]:
        """The Unix owner a pipefork kernel of this request runs (or would run) as."""
        kernel_id = handler.path_kwargs.get("kernel_id")
        manager = self.pipefork.serverapp.kernel_manager
        if kernel_id:
            try:
                provisioner = manager.get_kernel(kernel_id).provisioner
            except KeyError:
                return None, None
            if isinstance(provisioner, PipeforkProvisioner) and provisioner.target is not None:
                return provisioner.target.name, None
            return None, None
        if handler.request.method != "POST" or not handler.request.body:
            return None, None
        try:
            body = json.loads(handler.request.body)
        except ValueError:
            return None, None
        if resource == "sessions":
            kernel = body.get("kernel") or {}
            name = kernel.get("name") if isinstance(kernel, dict) else None
            path = body.get("path")
        else:
            name, path = body.get("name"), body.get("path")
        if not self._is_pipefork_spec(name or manager.default_kernel_name):
            return None, None
        # A console's "path" names no file: like the provisioner, fall back to the
        # nearest existing directory (the kernel's working directory).
        candidate = path or ""
        while candidate and not os.path.exists(os.path.join(self.pipefork.serverapp.root_dir, candidate)):
            candidate = os.path.dirname(candidate)
        _, owner = self.pipefork.notebook_owner(candidate)
        return owner, path

    def _is_pipefork_spec(self, name: str) -> bool:
        try:
            spec = self.pipefork.serverapp.kernel_spec_manager.get_kernel_spec(name)
        except Exception:  # noqa: BLE001 - unknown kernelspec: the kernels API reports it
            return False
        return spec.metadata.get("kernel_provisioner", {}).get("provisioner_name") == PROVISIONER_NAME
