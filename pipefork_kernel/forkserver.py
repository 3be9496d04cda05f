"""The warm root zygote: one single-threaded process that forks every run.

It is started by exec (``python -I -m pipefork_kernel.forkserver``) before the
caller holds any secret, imports the preload list once, warms it, freezes the
garbage collector and then only forks.  Children are never forked from the
Jupyter server or a kernel, which run threads and hold tokens.

Clients talk to it over a SOCK_SEQPACKET unix socket (0600 in a 0700
directory, peer uid checked), one connection per run: a ``run`` message
carries the target and limits plus, as SCM_RIGHTS, the child's end of a
socketpair.  The child reads its payload and writes its frames there; the
fork server itself only reports ``started`` and ``exited`` on the connection.
It reaps every child, enforces timeouts on the whole process group, kills a
run whose client disconnects, and as a subreaper kills orphans that escaped
a finished run.  When its parent goes away (EOF on stdin), it kills every run
and exits.
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import selectors
import shutil
import signal
import socket
import struct
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from .child import INLINE_BACKEND
from .privileges import prctl
from .users import TargetUser, UserPolicy

MAX_CONTROL_BYTES = 256 * 1024
_PR_SET_CHILD_SUBREAPER = 36
SWEEP_IDLE = 2.0
SWEEP_BUSY = 0.2
#: Signals a client may ask to deliver to its run's process group (interrupt, stop).
FORWARDED_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGKILL, signal.SIGHUP})


@dataclass
class Run:
    """One forked child and the connection of the client that asked for it."""

    pid: int
    kind: str
    conn: socket.socket | None
    user: str
    uid: int
    started: float
    deadline: float | None
    kill_grace: float
    kill_at: float | None = None
    timed_out: bool = False
    cancelled: bool = False


@dataclass
class ForkServerState:
    forks: int = 0
    reaped_orphans: int = 0
    killed_orphans: int = 0
    last_exit: float = 0.0
    runs: dict[int, Run] = field(default_factory=dict)


class ForkServerLoop:
    def __init__(self, config: dict[str, Any]):
        self.config = config
        self.policy = UserPolicy(
            min_uid=config["min_uid"], max_uid=config["max_uid"], allow_root=config["allow_root"]
        )
        self.max_runs_per_user = int(config["max_runs_per_user"])
        self.owner_uid = os.getuid()
        self.state = ForkServerState()
        self.selector = selectors.DefaultSelector()
        self.next_sweep = 0.0
        self.stopping = False

    # --- set-up ---------------------------------------------------------------------

    def listen(self, path: str) -> socket.socket:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        old_umask = os.umask(0o177)
        try:
            listener.bind(path)
        finally:
            os.umask(old_umask)
        os.chmod(path, 0o600)
        listener.listen(128)
        listener.setblocking(False)
        return listener

    def install_signals(self) -> int:
        read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(write_end)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGTERM, lambda *_: setattr(self, "stopping", True))
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        return read_end

    # --- main loop ------------------------------------------------------------------

    def serve(self, listener: socket.socket, wakeup_fd: int) -> None:
        self.selector.register(listener, selectors.EVENT_READ, "accept")
        self.selector.register(wakeup_fd, selectors.EVENT_READ, "signal")
        self.selector.register(sys.stdin.fileno(), selectors.EVENT_READ, "lifeline")
        while not self.stopping:
            for key, _ in self.selector.select(self._next_timer()):
                if key.data == "accept":
                    self._accept(listener)
                elif key.data == "signal":
                    _drain(wakeup_fd)
                    self._reap()
                elif key.data == "lifeline":
                    if not os.read(sys.stdin.fileno(), 4096):
                        self.stopping = True
                else:
                    self._client_message(key.data)
            self._timers()
        self.shutdown()

    def _next_timer(self) -> float:
        now = time.monotonic()
        times = [self.next_sweep]
        for run in self.state.runs.values():
            times += [t for t in (run.deadline, run.kill_at) if t is not None]
        return max(0.0, min(times) - now)

    def _timers(self) -> None:
        now = time.monotonic()
        for run in list(self.state.runs.values()):
            if run.deadline is not None and now >= run.deadline:
                run.timed_out = True
                run.deadline = None
                self._signal_group(run.pid, signal.SIGTERM)
                run.kill_at = now + run.kill_grace
            if run.kill_at is not None and now >= run.kill_at:
                self._signal_group(run.pid, signal.SIGKILL)
                run.kill_at = None
        if now >= self.next_sweep:
            self.sweep_orphans()
            busy = now - self.state.last_exit < 5.0
            self.next_sweep = now + (SWEEP_BUSY if busy else SWEEP_IDLE)

    # --- clients --------------------------------------------------------------------

    def _accept(self, listener: socket.socket) -> None:
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            return
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _, peer_uid, _ = struct.unpack("3i", creds)
        if peer_uid != self.owner_uid:
            _log(f"refused a connection from uid {peer_uid}")
            conn.close()
            return
        conn.settimeout(5.0)
        try:
            data, fds, _, _ = socket.recv_fds(conn, MAX_CONTROL_BYTES, 1)
        except OSError:
            conn.close()
            return
        try:
            message = json.loads(data) if data else {}
            self._handle(conn, message, fds)
        except Exception as exc:  # noqa: BLE001 - a bad request must not kill the zygote
            _send(conn, {"type": "refused", "reason": "bad-request", "message": str(exc)})
            conn.close()
        finally:
            for fd in fds:
                os.close(fd)

    def _handle(self, conn: socket.socket, message: dict[str, Any], fds: list[int]) -> None:
        op = message.get("op")
        if op == "status":
            _send(conn, self.status())
            conn.close()
            return
        if op not in ("run", "kernel") or len(fds) != 1:
            raise ValueError("expected a 'run' or 'kernel' request carrying one file descriptor")
        message["kind"] = op
        target = TargetUser.from_json(message["user"])
        self.policy.check(target)
        active = sum(1 for r in self.state.runs.values() if r.uid == target.uid and r.kind == "run")
        if op == "run" and active >= self.max_runs_per_user:
            _send(
                conn,
                {
                    "type": "refused",
                    "reason": "busy",
                    "message": (
                        f"user {target.name!r} already has {active} runs in progress, the most "
                        f"allowed (ForkServer.max_runs_per_user); retry when one has ended"
                    ),
                },
            )
            conn.close()
            return
        pid = self._fork(message, fds[0])
        timeout = message.get("timeout")
        now = time.monotonic()
        run = Run(
            pid=pid,
            kind=op,
            conn=conn,
            user=target.name,
            uid=target.uid,
            started=now,
            deadline=now + float(timeout) if timeout else None,
            kill_grace=float(message["limits"]["kill_grace"]),
        )
        self.state.runs[pid] = run
        conn.setblocking(False)
        self.selector.register(conn, selectors.EVENT_READ, run)
        _send(conn, {"type": "started", "pid": pid})

    def _client_message(self, run: Run) -> None:
        """A signal to deliver, or a cancel; a client that hangs up cancels its run."""
        if run.conn is None:
            return  # the run ended earlier in this same batch of events
        try:
            data = run.conn.recv(MAX_CONTROL_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.selector.unregister(run.conn)
            run.conn.close()
            run.conn = None
        else:
            try:
                message = json.loads(data)
            except ValueError:
                message = {}
            signum = message.get("signum") if message.get("op") == "signal" else None
            if signum in FORWARDED_SIGNALS:
                self._signal_group(run.pid, signum)
                return
        run.cancelled = True
        self._signal_group(run.pid, signal.SIGKILL)

    # --- children -------------------------------------------------------------------

    def _fork(self, request: dict[str, Any], data_fd: int) -> int:
        tasks = os.listdir("/proc/self/task")
        if len(tasks) != 1:
            raise RuntimeError(f"fork server has {len(tasks)} threads; refusing to fork")
        from .child import DATA_FD, child_main, report_internal_error

        forkserver_pid = os.getpid()
        gc.freeze()
        pid = os.fork()
        if pid == 0:
            status = 127
            try:
                devnull = os.open(os.devnull, os.O_RDWR)
                for fd in (0, 1, 2):
                    os.dup2(devnull, fd)
                os.dup2(data_fd, DATA_FD)
                status = child_main(request, forkserver_pid)
            except BaseException as exc:  # noqa: BLE001 - report, then exit no matter what
                report_internal_error(exc)
            finally:
                os._exit(status)
        self.state.forks += 1
        return pid

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            run = self.state.runs.pop(pid, None)
            if run is None:
                self.state.reaped_orphans += 1
                continue
            self._finish(run, status)

    def _finish(self, run: Run, status: int) -> None:
        # Whatever the run left in its process group dies with it.
        self._signal_group(run.pid, signal.SIGKILL)
        self.state.last_exit = time.monotonic()
        self.next_sweep = 0.0
        if run.conn is None:
            return
        report = {
            "type": "exited",
            "exit_code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
            "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
            "timed_out": run.timed_out,
            "cancelled": run.cancelled,
            "duration": time.monotonic() - run.started,
        }
        self.selector.unregister(run.conn)
        run.conn.setblocking(True)
        _send(run.conn, report)
        run.conn.close()
        run.conn = None

    @staticmethod
    def _signal_group(pgid: int, signum: int) -> None:
        try:
            os.killpg(pgid, signum)
        except (ProcessLookupError, PermissionError):
            pass

    def sweep_orphans(self) -> None:
        """Kill processes reparented to us whose run has ended.

        An orphan still in the session of an active run belongs to that run
        and is left alone until the run ends.
        """
        live_sessions = set(self.state.runs)
        for pid in _children(os.getpid()):
            if pid in self.state.runs:
                continue
            if _session_of(pid) in live_sessions:
                continue
            self._signal_group(pid, signal.SIGKILL)
            try:
                os.kill(pid, signal.SIGKILL)
                self.state.killed_orphans += 1
            except ProcessLookupError:
                pass

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "type": "status",
            "pid": os.getpid(),
            "uid": os.getuid(),
            "forks": self.state.forks,
            "threads": len(os.listdir("/proc/self/task")),
            "open_fds": len(os.listdir("/proc/self/fd")),
            "children": len(_children(os.getpid())),
            "reaped_orphans": self.state.reaped_orphans,
            "killed_orphans": self.state.killed_orphans,
            "active": [
                {"pid": r.pid, "kind": r.kind, "user": r.user, "uid": r.uid, "seconds": now - r.started}
                for r in self.state.runs.values()
            ],
            "preloaded": self.config["preload_modules"],
        }

    def shutdown(self) -> None:
        shutil.rmtree(os.path.dirname(self.config["socket_path"]), ignore_errors=True)
        for pid in list(self.state.runs):
            self._signal_group(pid, signal.SIGKILL)
        for pid in _children(os.getpid()):
            self._signal_group(pid, signal.SIGKILL)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def _session_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            # Fields after the parenthesized command: state ppid pgrp session ...
            return int(f.read().rsplit(")", 1)[1].split()[3])
    except (OSError, IndexError, ValueError):
        return None


def _send(conn: socket.socket, message: dict[str, Any]) -> None:
    try:
        conn.send(json.dumps(message).encode())
    except OSError:
        pass


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


def _log(text: str) -> None:
    print(f"[pipefork forkserver {os.getpid()}] {text}", file=sys.stderr, flush=True)


def main(argv: list[str]) -> None:
    config = json.loads(argv[1])
    # No PR_SET_PDEATHSIG here: it fires when the parent *thread* exits, and
    # clients start us from worker threads.  The stdin lifeline closes when the
    # parent process dies, however it dies.
    prctl(_PR_SET_CHILD_SUBREAPER, 1)
    os.chdir("/")
    os.environ["MPLBACKEND"] = INLINE_BACKEND
    # debugpy (preloaded for kernels) would warn about frozen modules on every start.
    os.environ["PYDEVD_DISABLE_FILE_VALIDATION"] = "1"
    for name in config["preload_modules"]:
        importlib.import_module(name)
    from . import child

    child.warm()
    loop = ForkServerLoop(config)
    listener = loop.listen(config["socket_path"])
    wakeup_fd = loop.install_signals()
    gc.freeze()
    sys.stdout.write(f"ready {os.getpid()}\n")
    sys.stdout.flush()
    loop.serve(listener, wakeup_fd)


if __name__ == "__main__":
    main(sys.argv)
