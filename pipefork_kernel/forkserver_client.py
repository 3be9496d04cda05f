"""Starting, reaching and restarting the fork server from the calling process."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from typing import Any

from traitlets import Float, Int, List, Unicode
from traitlets.config import LoggingConfigurable

from .errors import ForkServerError
from .users import UserPolicy

MAX_REPLY_BYTES = 256 * 1024
#: The fork server's environment: no tokens, nothing user-controlled (T6, T16).
FORKSERVER_ENV_KEYS = ("PATH", "LANG", "LC_ALL", "TZ")


class ForkServer(LoggingConfigurable):
    """The warm zygote process that forks every run."""

    preload_modules = List(
        Unicode(),
        default_value=[
            "IPython",
            "dill",
            "ipykernel.ipkernel",
            # What IPKernelApp.initialize() would otherwise import in every kernel:
            "ipykernel.debugger",
            "IPython.core.debugger",
            "IPython.extensions.storemagic",
            "psutil",
            "sqlite3",
            "tornado.queues",
            "tornado.platform.asyncio",
            "faulthandler",
            "pipefork_kernel.kernelapp",
        ],
        config=True,
        help=(
            "Modules imported by the fork server before its first fork. Children share "
            "them copy-on-write and need not read them from disk as the target user: add "
            "heavy modules every run uses (numpy, matplotlib)."
        ),
    )
    python = Unicode(
        sys.executable,
        config=True,
        help=(
            "Interpreter the fork server runs. Its installation must be readable by the "
            "target users for any import not preloaded (see `python -m pipefork_kernel doctor`)."
        ),
    )
    runtime_dir = Unicode(
        "",
        config=True,
        help="Parent directory of the fork server's private 0700 socket directory (default: $TMPDIR).",
    )
    max_runs_per_user = Int(
        16,
        config=True,
        help="Concurrent runs one target user may have; further requests are refused until one ends.",
    )
    start_timeout = Float(
        60.0,
        config=True,
        help="Seconds to wait for the fork server to import its preload list and become ready.",
    )

    def __init__(self, policy: UserPolicy, **kwargs: Any):
        super().__init__(**kwargs)
        self.policy = policy
        self.process: subprocess.Popen | None = None
        self.socket_dir: str | None = None
        self.lock = threading.Lock()
        self.restarts = 0

    @property
    def socket_path(self) -> str:
        assert self.socket_dir is not None
        return os.path.join(self.socket_dir, "forkserver.sock")

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        """Start the fork server by exec, or do nothing if it is running."""
        with self.lock:
            if self.running():
                return
            if self.process is not None:
                self.restarts += 1
                self.log.warning("pipefork fork server %s died; restarting it", self.process.pid)
                self._cleanup()
            self._spawn()

    def _spawn(self) -> None:
        self.socket_dir = tempfile.mkdtemp(prefix="pipefork-", dir=self.runtime_dir or None)
        os.chmod(self.socket_dir, 0o700)
        config = {
            "socket_path": self.socket_path,
            "preload_modules": list(self.preload_modules),
            "min_uid": self.policy.min_uid,
            "max_uid": self.policy.max_uid,
            "allow_root": self.policy.allow_root,
            "max_runs_per_user": self.max_runs_per_user,
        }
        env = {key: os.environ[key] for key in FORKSERVER_ENV_KEYS if key in os.environ}
        env["IPYTHONDIR"] = os.path.join(self.socket_dir, "ipython")
        # -I: no PYTHONPATH, no user site, no script directory on sys.path.
        self.process = subprocess.Popen(
            [self.python, "-I", "-m", "pipefork_kernel.forkserver", json.dumps(config)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd="/",
            env=env,
            close_fds=True,
        )
        ready = _readline_with_timeout(self.process, self.start_timeout)
        if not ready.startswith(b"ready "):
            self.process.kill()
            self.process.wait()
            raise ForkServerError(
                f"the fork server ({self.python}) did not start: it printed {ready!r}. "
                f"Check that pipefork and {', '.join(self.preload_modules)} import in that "
                "interpreter; its error output is above."
            )
        self.log.info("pipefork fork server %s ready", self.process.pid)

    def stop(self) -> None:
        """Close the lifeline; the fork server kills its runs and exits."""
        with self.lock:
            self._cleanup()
            self.process = None

    def _cleanup(self) -> None:
        if self.process is not None:
            if self.process.stdin:
                self.process.stdin.close()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            if self.process.stdout:
                self.process.stdout.close()
        if self.socket_dir:
            shutil.rmtree(self.socket_dir, ignore_errors=True)
            self.socket_dir = None

    def connect(self) -> socket.socket:
        """A fresh control connection, restarting a dead fork server once."""
        self.start()
        for attempt in (1, 2):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
            try:
                sock.connect(self.socket_path)
                return sock
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                sock.close()
                if attempt == 2 or self.running():
                    raise ForkServerError(f"cannot reach the fork server: {exc}") from exc
                self.start()
        raise AssertionError("unreachable")

    def status(self) -> dict[str, Any]:
        """The fork server's own report: pid, forks, threads, fds, children, active runs."""
        with self.connect() as sock:
            try:
                sock.send(json.dumps({"op": "status"}).encode())
                reply = sock.recv(MAX_REPLY_BYTES)
            except OSError as exc:
                raise ForkServerError(f"the fork server went away during a status request: {exc}") from None
        if not reply:
            raise ForkServerError("the fork server went away during a status request")
        return json.loads(reply)

    async def astatus(self) -> dict[str, Any]:
        return await asyncio.to_thread(self.status)


def _readline_with_timeout(process: subprocess.Popen, timeout: float) -> bytes:
    result: list[bytes] = []
    reader = threading.Thread(target=lambda: result.append(process.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return result[0] if result else b""
