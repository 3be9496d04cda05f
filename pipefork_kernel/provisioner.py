"""The ``pipefork-provisioner``: each notebook's kernel runs as the notebook's owner.

jupyter_client asks a provisioner to launch, signal, poll and kill a kernel.
This one resolves the owner of the notebook (``JPY_SESSION_NAME``, which
Jupyter Server sets to its path, resolved with realpath; else the kernel's
working directory), applies the engine's policy, and asks the fork server for
a child that drops to that owner and becomes an IPython kernel.  The kernel is
the fork server's child, so signals and exit reports go through the control
connection, which also ties the kernel's life to this provisioner's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import select
import signal
import socket
from typing import Any

from jupyter_client.connect import KernelConnectionInfo
from jupyter_client.provisioning.local_provisioner import LocalProvisioner
from traitlets import Float, List, Unicode

from . import get_engine, protocol
from .errors import CapacityError, ForkServerError, PipeforkError, PolicyError
from .forkserver_client import MAX_REPLY_BYTES
from .users import TargetUser


class KernelStartError(PipeforkError):
    """The owner kernel could not start; the message is shown to the person opening it."""


class PipeforkProvisioner(LocalProvisioner):
    """Launches the kernel as the Unix owner of the notebook, forked from the fork server."""

    user = Unicode(
        "",
        config=True,
        help="Run every kernel of this kernelspec as this user instead of the notebook's owner "
        "(for consoles and scripts, which have no notebook).",
    )
    env_allowlist = List(
        Unicode(),
        default_value=["JPY_SESSION_NAME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TERM"],
        config=True,
        help="Variables of the launching environment passed to the kernel. Jupyter Server "
        "hands kernels its whole environment, tokens included; only these get through.",
    )
    start_timeout = Float(
        30.0,
        config=True,
        help="Seconds the forked kernel has to report that it is ready.",
    )

    target: TargetUser | None = None
    control: socket.socket | None = None
    exit_code: int | None = None

    # --- who ------------------------------------------------------------------------

    def resolve_owner(self, env: dict[str, str], cwd: str | None) -> TargetUser:
        """The user this kernel must run as, checked against the engine's policy."""
        engine = get_engine()
        if self.user:
            return engine.resolve(self.user)
        session_path = env.get("JPY_SESSION_NAME", "")
        if session_path and not os.path.isabs(session_path) and cwd:
            session_path = os.path.join(cwd, session_path)
        candidates = [p for p in (session_path, cwd) if p]
        for candidate in candidates:
            real = os.path.realpath(candidate)
            if os.path.exists(real):
                break
        else:
            raise KernelStartError(
                "cannot tell whose kernel this is: no notebook path (JPY_SESSION_NAME) or working "
                "directory exists; pin a user with PipeforkProvisioner.user for consoles"
            )
        uid = os.stat(real).st_uid
        try:
            owner = pwd.getpwuid(uid).pw_name
        except KeyError:
            raise PolicyError(
                f"{real} is owned by uid {uid}, which has no account; chown it to its user"
            ) from None
        try:
            return engine.resolve(owner)
        except PolicyError as exc:
            raise PolicyError(
                f"a pipefork kernel runs as the owner of {real}, which is {owner!r}, and {exc}. "
                "Give the notebook to the person who should run it (chown), or open it with "
                "another kernel."
            ) from None

    # --- launch ---------------------------------------------------------------------

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        self.target = self.resolve_owner(kwargs.get("env") or {}, kwargs.get("cwd"))
        return await super().pre_launch(**kwargs)

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> KernelConnectionInfo:
        assert self.target is not None
        env = kwargs.get("env") or {}
        engine = get_engine()
        request = {
            "op": "kernel",
            "user": self.target.to_json(),
            "limits": engine.limits.to_json(),
            "timeout": None,
            "cwd": kwargs.get("cwd"),
            "max_output_bytes": engine.limits.max_output_bytes,
            "max_frame_bytes": engine.limits.max_frame_bytes,
        }
        # The key and environment go straight to the child, never through the fork
        # server, whose memory every later child (of any user) inherits.
        job = {
            "type": "job",
            "kind": "kernel",
            "env": {key: env[key] for key in self.env_allowlist if key in env},
            "connection_info": {
                k: v.decode() if isinstance(v, bytes) else v for k, v in self.connection_info.items()
            },
        }
        self.control, self.pid = await asyncio.to_thread(self._start, request, job)
        self.pgid = self.pid
        self.exit_code = None
        self.cwd = kwargs.get("cwd")
        return self.connection_info

    def _start(self, request: dict[str, Any], job: dict[str, Any]) -> tuple[socket.socket, int]:
        """Fork the kernel and wait for its start-up report (in a worker thread)."""
        assert self.target is not None
        control = get_engine().forkserver.connect()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with theirs:
                socket.send_fds(control, [json.dumps(request).encode()], [theirs.fileno()])
            reply = json.loads(control.recv(MAX_REPLY_BYTES) or b"{}")
            if reply.get("type") == "refused":
                error = CapacityError if reply.get("reason") == "busy" else PolicyError
                raise error(reply.get("message", "the fork server refused the kernel"))
            if reply.get("type") != "started":
                raise ForkServerError("the fork server closed the connection before starting the kernel")
            ours.sendall(protocol.encode(job))
            ready, _, _ = select.select([ours], [], [], self.start_timeout)
            frame = protocol.read_frame(ours.fileno()) if ready else None
        except BaseException:
            control.close()
            raise
        finally:
            ours.close()
        if frame is None or frame.get("type") != "kernel_ready":
            control.close()
            name = self.target.name
            if frame is not None and frame.get("type") == "error":
                raise KernelStartError(str(frame.get("evalue", "the kernel failed to start")))
            if not ready:
                raise KernelStartError(f"the kernel as {name!r} did not start within {self.start_timeout} s")
            raise KernelStartError(f"the kernel as {name!r} exited during start-up")
        return control, int(reply["pid"])

    # --- life and death -------------------------------------------------------------

    @property
    def has_process(self) -> bool:
        return self.control is not None

    async def poll(self) -> int | None:
        if self.exit_code is not None or self.control is None:
            return self.exit_code
        try:
            data = self.control.recv(MAX_REPLY_BYTES, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return None
        except OSError:
            data = b""
        report = json.loads(data) if data else {}
        if report.get("type") == "exited":
            code = report.get("exit_code")
            self.exit_code = code if code is not None else -int(report.get("signal") or signal.SIGKILL)
        else:
            # The fork server went away: PR_SET_PDEATHSIG took the kernel itself, not
            # what it started; the rest of its process group goes now.
            self.exit_code = -signal.SIGKILL
            if self.pgid:
                with contextlib.suppress(OSError):
                    os.killpg(self.pgid, signal.SIGKILL)
        return self.exit_code

    async def wait(self) -> int | None:
        while self.control is not None and await self.poll() is None:
            await asyncio.sleep(0.05)
        return self.exit_code

    async def send_signal(self, signum: int) -> None:
        if signum == 0 or self.control is None or await self.poll() is not None:
            return
        try:
            self.control.send(json.dumps({"op": "signal", "signum": int(signum)}).encode())
        except OSError:
            pass

    async def kill(self, restart: bool = False) -> None:
        await self.send_signal(signal.SIGKILL)

    async def terminate(self, restart: bool = False) -> None:
        await self.send_signal(signal.SIGTERM)

    async def cleanup(self, restart: bool = False) -> None:
        await super().cleanup(restart=restart)
        if self.control is not None:
            # Hanging up makes the fork server kill whatever is left of the kernel.
            self.control.close()
            self.control = None
        self.pid = None

    async def get_provisioner_info(self) -> dict[str, Any]:
        info = await super().get_provisioner_info()
        info["user"] = self.target.name if self.target else None
        return info
