"""What each identity may do on a server that runs as root.

Everything Jupyter Server does itself (terminals, file access, stock kernels,
nbconvert) runs as the server's user: root.  So an identity that is not an
admin may only use what pipefork runs as its own Unix user, and its own
files.  The check sits in the authorizer, which sees both the identity
Jupyter authenticated and the request:

- terminals and nbconvert: admins only;
- files (``contents``): a non-admin reads its own files and lists directories,
  and writes only where it owns the file (or the folder a new file goes in);
- kernels and sessions: a pipefork kernel only if the identity may run as the
  kernel's owner (for a new kernel, the notebook's owner); a stock kernel,
  which runs as root, only for admins.
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
ADMIN_ONLY_RESOURCES = frozenset({"terminals", "nbconvert"})


class RootServerAuthorizer(Authorizer):
    """Wraps the server's authorizer and keeps non-admins to what runs as themselves."""

    wrapped = AnyTrait(help="The authorizer that decides everything else first.")
    pipefork = AnyTrait(help="The PipeforkApp whose policy applies.")

    async def is_authorized(self, handler: Any, user: Any, action: str, resource: str) -> bool:
        allowed = self.wrapped.is_authorized(handler, user, action, resource)
        if inspect.isawaitable(allowed):
            allowed = await allowed
        if not allowed:
            return False
        admin = self.pipefork.is_admin(user)
        if resource in ("kernels", "sessions"):
            self._check_kernel(handler, user, admin, resource)
        elif admin:
            return True
        elif resource in ADMIN_ONLY_RESOURCES:
            raise HTTPError(
                403, f"{resource} run as the server's user (root): only admin identities may use them"
            )
        elif resource == "contents":
            self._check_files(handler, user)
        return True

    # --- files --------------------------------------------------------------------

    def _check_files(self, handler: Any, user: Any) -> None:
        app = self.pipefork
        me = app.run_policy.unix_name(user.username)
        path = handler.path_kwargs.get("path") or ""
        targets = [path]
        if handler.request.method == "PATCH" and handler.request.body:
            try:
                targets.append(str(json.loads(handler.request.body).get("path") or ""))
            except (ValueError, AttributeError):
                raise HTTPError(400, "the body must be a JSON object") from None
        for target in targets:
            real, owner = app.notebook_owner(self._existing(target))
            writing = handler.request.method not in ("GET", "HEAD")
            if owner != me and (writing or not os.path.isdir(real)):
                raise HTTPError(
                    403,
                    f"{target!r} belongs to {owner!r}; identity {user.username!r} may use only its own files",
                )

    def _existing(self, api_path: str) -> str:
        """The path, or its nearest existing parent (where a new file would go)."""
        root = self.pipefork.serverapp.root_dir
        candidate = api_path.strip("/")
        while candidate and not os.path.lexists(os.path.join(root, candidate)):
            candidate = os.path.dirname(candidate)
        return candidate

    # --- kernels ------------------------------------------------------------------

    def _check_kernel(self, handler: Any, user: Any, admin: bool, resource: str) -> None:
        kind, owner, path = self._kernel_of(handler, resource)
        if kind is None:
            return
        app = self.pipefork
        if kind == "stock":
            if not admin:
                raise HTTPError(
                    403,
                    "this kernel runs as the server's user (root): only admin identities may use it; "
                    "use the 'Python 3 (pipefork)' kernel, which runs as you",
                )
            return
        decision = app.run_policy.decide(user.username, admin, owner, owner)
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

    def _kernel_of(self, handler: Any, resource: str) -> tuple[str | None, str | None, str | None]:
        """("pipefork", owner, path), ("stock", None, path), or (None, ...) if no kernel is involved."""
        kernel_id = handler.path_kwargs.get("kernel_id")
        manager = self.pipefork.serverapp.kernel_manager
        if kernel_id:
            try:
                provisioner = manager.get_kernel(kernel_id).provisioner
            except KeyError:
                return None, None, None  # the kernels API answers 404
            if isinstance(provisioner, PipeforkProvisioner) and provisioner.target is not None:
                return "pipefork", provisioner.target.name, None
            return "stock", None, None
        if handler.request.method != "POST" or not handler.request.body:
            return None, None, None
        try:
            body = json.loads(handler.request.body)
        except ValueError:
            return None, None, None
        if resource == "sessions":
            kernel = body.get("kernel") or {}
            if not isinstance(kernel, dict) or kernel.get("id"):
                return None, None, None  # an existing kernel: checked when it is used
            name = kernel.get("name")
        else:
            name = body.get("name")
        path = body.get("path")
        if not self._is_pipefork_spec(name or manager.default_kernel_name):
            return "stock", None, path
        # A console's "path" names no file: like the provisioner, use the nearest
        # existing directory (the kernel's working directory).
        _, owner = self.pipefork.notebook_owner(self._existing(path or ""))
        return "pipefork", owner, path

    def _is_pipefork_spec(self, name: str) -> bool:
        try:
            spec = self.pipefork.serverapp.kernel_spec_manager.get_kernel_spec(name)
        except Exception:  # noqa: BLE001 - unknown kernelspec: the kernels API reports it
            return False
        return spec.metadata.get("kernel_provisioner", {}).get("provisioner_name") == PROVISIONER_NAME
