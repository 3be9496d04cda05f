"""Parent side of a run: submit, stream, time out, kill, reap.

``Engine`` is the configurable entry point; the module-level ``run_as`` and
friends use one shared engine.  The async methods are the real
implementation; the sync ones run them on a private event loop thread while
outputs are relayed from the caller's own thread (so ``display()`` in a
notebook lands in the calling cell).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import json
import os
import queue
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import dill
from traitlets import Instance, default
from traitlets.config import LoggingConfigurable

from . import protocol
from .errors import (
    CapacityError,
    ChildCrashed,
    ForkServerError,
    PipeforkError,
    PolicyError,
    ProtocolError,
    RemoteError,
    ResultNotJSON,
    RunTimeout,
)
from .forkserver_client import MAX_REPLY_BYTES, ForkServer
from .limits import RunLimits
from .outputs import OutputCollector, relay_output
from .users import TargetUser, UserPolicy, current_user

OutputCallback = Callable[[dict[str, Any]], None]
#: After the child exited, how long the pipe may stay quiet before we stop reading it.
DRAIN_GRACE = 5.0
#: Room above the output budget for the child's own "output dropped" notice.
NOTICE_SLACK = 4096
#: Errors the child reports about pipefork itself (not user code) before it exits.
CHILD_FAILURES = ("PrivilegeDropFailed", "PipeforkInternalError")


@dataclass
class RunResult:
    """How one run ended, with its outputs in the shape a notebook stores."""

    status: str
    user: str
    uid: int
    outputs: list[dict[str, Any]] = field(default_factory=list, repr=False)
    error: dict[str, Any] | None = None
    result: Any = None
    exit_code: int | None = None
    signal: int | None = None
    duration: float = 0.0
    pid: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "user": self.user,
            "uid": self.uid,
            "error": self.error,
            "result": self.result,
            "exit_code": self.exit_code,
            "signal": self.signal,
            "duration": self.duration,
        }


class _RunState:
    """What the parent learns about one run while it streams."""

    def __init__(self, target: TargetUser, on_output: OutputCallback | None, max_output: int):
        self.target = target
        self.on_output = on_output
        self.collector = OutputCollector()
        self.max_output = max_output + NOTICE_SLACK
        self.output_bytes = 0
        self.capped = False
        self.done_status: str | None = None
        self.result: Any = None
        self.error: dict[str, Any] | None = None
        self.protocol_error: str | None = None
        self.frames = 0

    def output(self, frame: dict[str, Any]) -> None:
        output = protocol.to_nbformat(frame)
        if frame["type"] == "error":
            self.error = {k: output[k] for k in ("ename", "evalue", "traceback")}
        else:
            size = len(frame["text"]) if frame["type"] == "stream" else len(json.dumps(frame))
            self.output_bytes += size
            if self.output_bytes > self.max_output:
                if self.capped:
                    return
                self.capped = True
                output = {
                    "output_type": "stream",
                    "name": "stderr",
                    "text": "\n[pipefork: output limit reached; further output is dropped]\n",
                }
        self.collector.add(output)
        if self.on_output is not None:
            self.on_output(output)

    def frame(self, frame: dict[str, Any]) -> None:
        self.frames += 1
        if self.done_status is not None:
            raise ProtocolError(f"the child sent a {frame['type']!r} frame after 'done'")
        kind = frame["type"]
        if kind == "done":
            self.done_status = frame["status"]
        elif kind == "result":
            if self.result is not None:
                raise ProtocolError("the child sent two 'result' frames")
            self.result = frame["value"]
        else:
            self.output(frame)


class Engine(LoggingConfigurable):
    """Runs cells and functions as other Unix users through one fork server."""

    policy = Instance(UserPolicy, help="Which users runs may become.")
    limits = Instance(RunLimits, help="Timeouts, output caps and rlimits of each run.")
    forkserver = Instance(ForkServer, help="The fork server every run is forked from.")

    @default("policy")
    def _default_policy(self) -> UserPolicy:
        return UserPolicy(parent=self)

    @default("limits")
    def _default_limits(self) -> RunLimits:
        return RunLimits(parent=self)

    @default("forkserver")
    def _default_forkserver(self) -> ForkServer:
        return ForkServer(self.policy, parent=self)

    # --- policy -------------------------------------------------------------------

    def resolve(self, user: str) -> TargetUser:
        """Resolve ``user`` for this process: any allowed user as root, else only itself."""
        if os.geteuid() == 0:
            return self.policy.resolve(user)
        me = current_user()
        if user != me.name:
            raise PolicyError(
                f"running as {user!r} needs root: this process runs as {me.name!r}. Start it "
                "as root, or send the run to a pipefork server extension's REST API "
                "(pipefork_kernel.client). Running as yourself works without root."
            )
        return me

    # --- async API ----------------------------------------------------------------

    async def arun_cell_as(
        self,
        user: str,
        code: str,
        *,
        timeout: float | None = None,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        on_output: OutputCallback | None = None,
        push: dict[str, Any] | None = None,
        pull: list[str] | None = None,
    ) -> RunResult:
        """Run cell source once in a fresh IPython shell as ``user``.

        ``push`` puts variables into the cell's namespace (dill, loaded only by
        the child); ``pull`` names variables to bring back, JSON-compatible
        ones only: ``result.result`` is then ``{"values", "missing", "not_json"}``.
        """
        return await self.arun(
            user, cell_job(code, push, pull), timeout=timeout, cwd=cwd, env=env, on_output=on_output
        )

    async def arun_as(
        self,
        user: str,
        func: Callable[..., Any],
        args: tuple = (),
        kwargs: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        on_output: OutputCallback | None = relay_output,
    ) -> Any:
        """Run ``func(*args, **kwargs)`` once as ``user`` and return its JSON result."""
        job = function_job(func, args, kwargs)
        result = await self.arun(user, job, timeout=timeout, cwd=cwd, env=env, on_output=on_output)
        return unwrap(result, timeout=self.limits.effective_timeout(timeout))

    async def arun(
        self,
        user: str,
        job: dict[str, Any],
        *,
        timeout: float | None = None,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        on_output: OutputCallback | None = None,
    ) -> RunResult:
        """Run a prepared job frame as ``user``; the core of every other method."""
        target = self.resolve(user)
        if env is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
            raise TypeError("env must map str to str")
        request = {
            "op": "run",
            "user": target.to_json(),
            "limits": self.limits.to_json(),
            "timeout": self.limits.effective_timeout(timeout),
            "cwd": cwd,
            "max_output_bytes": self.limits.max_output_bytes,
            "max_frame_bytes": self.limits.max_frame_bytes,
        }
        state = _RunState(target, on_output, self.limits.max_output_bytes)
        started = time.monotonic()
        control = await asyncio.to_thread(self.forkserver.connect)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        loop = asyncio.get_running_loop()
        try:
            with theirs:
                try:
                    socket.send_fds(control, [json.dumps(request).encode()], [theirs.fileno()])
                except OSError as exc:
                    raise ForkServerError(
                        f"the fork server went away before the run started ({exc}); retry: "
                        "the next run restarts it"
                    ) from None
            control.setblocking(False)
            reply = await _recv_json(loop, control)
            if reply is None:
                raise ForkServerError("the fork server closed the connection before starting the run")
            if reply.get("type") == "refused":
                error = CapacityError if reply.get("reason") == "busy" else PolicyError
                raise error(reply.get("message", "the fork server refused the run"))
            pid = int(reply["pid"])
            reader, writer = await asyncio.open_unix_connection(sock=ours)
            job = {**job, "env": env or {}}
            exit_report = await self._stream(loop, control, reader, writer, job, state)
        finally:
            _close(loop, control)
            ours.close()
        if exit_report["type"] == "lost":
            # The fork server died: PR_SET_PDEATHSIG took the run's first process, not
            # the rest of its process group.  We may signal it: same user, or root.
            with contextlib.suppress(OSError):
                os.killpg(pid, signal.SIGKILL)
        return self._result(state, exit_report, pid, time.monotonic() - started)

    async def _stream(
        self,
        loop: asyncio.AbstractEventLoop,
        control: socket.socket,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        job: dict[str, Any],
        state: _RunState,
    ) -> dict[str, Any]:
        """Send the job, relay frames, and wait for the fork server's exit report."""
        writer.write(protocol.encode(job, max_bytes=2**31 - 1))
        sender = asyncio.ensure_future(writer.drain())
        pump = asyncio.ensure_future(self._pump(reader, state))
        exited = asyncio.ensure_future(_recv_json(loop, control))
        try:
            await asyncio.wait({pump, exited}, return_when=asyncio.FIRST_COMPLETED)
            if pump.done() and pump.exception() is not None:
                # Bad frames, or our own on_output failing: either way the run must stop.
                with contextlib.suppress(OSError):
                    control.send(json.dumps({"op": "cancel"}).encode())
            report = await exited
            # Frames may still be in the pipe (a busy loop reads them late): keep
            # reading while they come; a pipe held open by an escaped process but
            # quiet for DRAIN_GRACE ends the wait.
            seen = -1
            while not pump.done() and state.frames != seen:
                seen = state.frames
                await asyncio.wait({pump}, timeout=DRAIN_GRACE)
            failure = pump.exception() if pump.done() else None
            if isinstance(failure, ProtocolError):
                state.protocol_error = str(failure)
            elif failure is not None:
                raise failure  # the caller's on_output raised: that is the caller's error
            return report or {"type": "lost"}
        except asyncio.CancelledError:
            # The caller gave up (interrupt, disconnect): the fork server kills the run
            # when we hang up.
            _close(loop, control)
            raise
        finally:
            for task in (sender, pump, exited):
                task.cancel()
            writer.close()

    async def _pump(self, reader: asyncio.StreamReader, state: _RunState) -> None:
        while True:
            try:
                frame = await protocol.aread_frame(reader, self.limits.max_frame_bytes)
            except ConnectionResetError:
                return  # the child exited without reading all of its job: an end, not garbage
            if frame is None:
                return
            state.frame(protocol.validate_child_frame(frame))

    def _result(self, state: _RunState, report: dict[str, Any], pid: int, duration: float) -> RunResult:
        target = state.target
        result = RunResult(
            status="ok",
            user=target.name,
            uid=target.uid,
            outputs=state.collector.outputs,
            error=state.error,
            result=state.result,
            exit_code=report.get("exit_code"),
            signal=report.get("signal"),
            duration=duration,
            pid=pid,
        )
        if state.protocol_error is not None:
            result.status = "error"
            result.error = {
                "ename": "ProtocolError",
                "evalue": f"the run as {target.name!r} sent an invalid frame and was killed: "
                f"{state.protocol_error}",
                "traceback": [],
            }
        elif report.get("timed_out"):
            result.status = "timeout"
        elif report["type"] == "lost":
            result.status = "crashed"
            result.error = {
                "ename": "ForkServerLost",
                "evalue": "the fork server died during the run; it is restarted on the next run",
                "traceback": [],
            }
        elif state.done_status is None or result.exit_code != 0:
            result.status = "crashed"
            if result.error is None or result.error["ename"] not in CHILD_FAILURES:
                result.error = {"ename": "ChildCrashed", "evalue": describe_exit(result), "traceback": []}
        else:
            result.status = state.done_status
        return result

    # --- sync API -----------------------------------------------------------------

    def run_cell_as(
        self,
        user: str,
        code: str,
        *,
        timeout: float | None = None,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        on_output: OutputCallback | None = None,
        push: dict[str, Any] | None = None,
        pull: list[str] | None = None,
    ) -> RunResult:
        """Run cell source once as ``user`` in a fresh IPython shell; return a RunResult.

        Blocking form of :meth:`arun_cell_as`.
        """
        job = cell_job(code, push, pull)
        return run_sync(
            lambda emit: self.arun(user, job, timeout=timeout, cwd=cwd, env=env, on_output=emit),
            on_output,
        )

    def run_as(
        self,
        user: str,
        func: Callable[..., Any] | None = None,
        args: tuple = (),
        kwargs: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        on_output: OutputCallback | None = relay_output,
    ) -> Any:
        """Call ``func(*args, **kwargs)`` once as ``user`` and return its (JSON) result.

        Output is re-emitted here while the function runs.  Raises RemoteError if
        the function raised, RunTimeout, ChildCrashed, PolicyError or ResultNotJSON.

        Without ``func`` it is a decorator: each call of the decorated function
        runs as ``user``::

            @run_as("student1", timeout=10)
            def check(path): ...
        """
        if func is None:

            def decorate(function: Callable[..., Any]) -> Callable[..., Any]:
                @functools.wraps(function)
                def as_user(*call_args: Any, **call_kwargs: Any) -> Any:
                    return self.run_as(
                        user,
                        function,
                        call_args,
                        call_kwargs,
                        timeout=timeout,
                        cwd=cwd,
                        env=env,
                        on_output=on_output,
                    )

                return as_user

            return decorate
        job = function_job(func, args, kwargs)
        result = run_sync(
            lambda emit: self.arun(user, job, timeout=timeout, cwd=cwd, env=env, on_output=emit),
            on_output,
        )
        return unwrap(result, timeout=self.limits.effective_timeout(timeout))

    def close(self) -> None:
        """Stop the fork server (runs in progress are killed)."""
        self.forkserver.stop()


def cell_job(code: str, push: dict[str, Any] | None, pull: list[str] | None) -> dict[str, Any]:
    if not isinstance(code, str):
        raise TypeError(f"code must be a str, not {type(code).__name__}")
    job: dict[str, Any] = {"type": "job", "kind": "cell", "code": code}
    if push:
        try:
            job["push"] = base64.b64encode(dill.dumps(dict(push), recurse=True)).decode()
        except Exception as exc:
            raise PipeforkError(f"cannot serialize the pushed variables with dill: {exc}") from exc
    if pull:
        bad = [name for name in pull if not (isinstance(name, str) and name.isidentifier())]
        if bad:
            raise PipeforkError(f"cannot pull {bad!r}: give variable names")
        job["pull"] = list(pull)
    return job


def function_job(func: Callable[..., Any], args: tuple, kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """Serialize a call with dill in the caller; only the child ever loads it."""
    if not callable(func):
        raise TypeError(f"run_as needs a callable, got {type(func).__name__}")
    try:
        payload = dill.dumps((func, tuple(args), dict(kwargs or {})), recurse=True)
    except Exception as exc:
        raise PipeforkError(
            f"cannot serialize {getattr(func, '__qualname__', func)!r} and its arguments with "
            f"dill: {exc}. Pass plain data as arguments and import modules inside the function."
        ) from exc
    # Like multiprocessing's spawn: the child can import the caller's own modules
    # by reference, if the target user can read them.
    return {
        "type": "job",
        "kind": "function",
        "payload": base64.b64encode(payload).decode(),
        "sys_path": [p for p in sys.path if isinstance(p, str) and p],
    }


def describe_exit(result: RunResult) -> str:
    if result.signal is not None:
        name = signal.Signals(result.signal).name if result.signal in signal.valid_signals() else "?"
        how = f"was killed by signal {result.signal} ({name})"
    else:
        how = f"exited with status {result.exit_code} before finishing"
    return (
        f"the run as {result.user!r} {how}. Its output up to that point is kept; "
        "look for a crash in native code, os._exit(), or a resource limit (memory, processes)."
    )


def unwrap(result: RunResult, timeout: float | None) -> Any:
    """Turn a function run's result into its return value, or the matching exception."""
    if result.status == "ok":
        return result.result
    if result.status == "timeout":
        raise RunTimeout(
            f"the run as {result.user!r} did not finish within {timeout} s and its processes "
            "were killed; pass a larger timeout= or make the function finish sooner"
        )
    error = result.error or {"ename": "Error", "evalue": "unknown failure", "traceback": []}
    if result.status == "crashed":
        raise ChildCrashed(error["evalue"])
    if error["ename"] == "ResultNotJSON":
        raise ResultNotJSON(error["evalue"])
    if error["ename"] == "ProtocolError":
        raise ProtocolError(error["evalue"])
    raise RemoteError(error["ename"], error["evalue"], error["traceback"], result.user)


def _close(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    """Close a socket the loop may still watch (a cancelled sock_recv unregisters late).

    Closing it while registered would leave the fd number watched: the next socket
    to get that number would never be woken.
    """
    if sock.fileno() != -1:
        loop.remove_reader(sock.fileno())
        sock.close()


async def _recv_json(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> dict[str, Any] | None:
    try:
        data = await loop.sock_recv(sock, MAX_REPLY_BYTES)
    except OSError:
        return None
    return json.loads(data) if data else None


def run_sync(start: Callable[[OutputCallback], Any], on_output: OutputCallback | None) -> Any:
    """Run a coroutine on a private loop thread, relaying outputs in this thread."""
    events: queue.Queue = queue.Queue()
    holder: dict[str, Any] = {}

    async def main() -> Any:
        holder["loop"] = asyncio.get_running_loop()
        holder["task"] = asyncio.current_task()
        return await start(lambda output: events.put(("output", output)))

    def worker() -> None:
        try:
            holder["value"] = asyncio.run(main())
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            holder["error"] = exc
        finally:
            events.put(("end", None))

    thread = threading.Thread(target=worker, name="pipefork-run", daemon=True)
    thread.start()
    try:
        while True:
            kind, item = events.get()
            if kind == "end":
                break
            if on_output is not None:
                on_output(item)
    except BaseException:
        # Interrupted (the stop button), or on_output failed: the run ends with us.
        if "task" in holder:
            holder["loop"].call_soon_threadsafe(holder["task"].cancel)
        thread.join()
        raise
    if "error" in holder:
        raise holder["error"]
    return holder["value"]
