"""Everything a forked child does: drop privileges, then run one payload.

This module is preloaded into the fork server, and :func:`warm` exercises it
there, so a child starts with IPython, dill and the capture machinery already
imported and their one-time work done.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import sys
import traceback
from typing import Any

import dill
from jupyter_client import localinterfaces
from traitlets.config import Config

from . import protocol
from .capture import CaptureShell, FrameSink, OutputPump, StreamCapture
from .privileges import DROP_FAILED, DropError, clean_environment, drop
from .users import TargetUser

DATA_FD = 3
#: Figures shown in a run come back as image/png display data.
INLINE_BACKEND = "module://matplotlib_inline.backend_inline"
#: The job frame comes from root, not from the user; it may carry large arguments.
MAX_JOB_BYTES = 1024**3

_shell: CaptureShell | None = None


def warm() -> None:
    """Do the one-time work of a run once, in the fork server, before any fork."""
    global _shell
    config = Config()
    config.HistoryManager.enabled = False
    _shell = CaptureShell.instance(config=config)
    # The profile's database (%cd history, %store, %bookmark) lives in root's
    # private directory; a one-shot run keeps such state in memory instead.
    _shell.db = {}
    _shell.run_cell("1 + 1", store_history=True)
    _shell.run_cell("1 / 0", store_history=True)
    _shell.reset(new_session=False)
    dill.loads(dill.dumps((lambda x: x, (1,), {}), recurse=True))
    # Every kernel's connection set-up scans the network interfaces; do it once.
    localinterfaces.localhost()
    json.dumps({"warm": [1.0, None, "x"]}, allow_nan=False)


class UnreadableEnvironmentFinder:
    """Explains a failed import when the user cannot read the Python installation.

    Installed last on ``sys.meta_path`` after the drop: it is only asked when no
    other finder found the module.
    """

    @staticmethod
    def find_spec(fullname, path=None, target=None):
        blocked = [p for p in sys.path if p and unreadable_path(p)]
        if blocked:
            raise ModuleNotFoundError(
                f"No module named {fullname!r} that user {os.environ.get('USER')!r} can read: "
                f"these import paths are not readable by that user: {', '.join(blocked[:3])}. "
                "Install pipefork and your packages into a world-readable environment "
                "(e.g. /usr/bin/python3 -m venv /opt/pipefork), or add the module to "
                "ForkServer.preload_modules so it is imported before the fork.",
                name=fullname,
            )
        return None


def unreadable_path(path: str) -> bool:
    """True when the nearest ancestor this user can see blocks reading ``path``."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    return not os.access(existing, os.R_OK | os.X_OK)


def _reset_signals() -> None:
    signal.set_wakeup_fd(-1)
    for signum in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


def _capture_std_fds(sink: FrameSink) -> OutputPump:
    """fd 0 ← /dev/null; fds 1 and 2 → pipes relayed as stream frames by one thread."""
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    sources = {}
    for fd, stream in ((1, sys.stdout), (2, sys.stderr)):
        read_end, write_end = os.pipe()
        os.dup2(write_end, fd)
        os.close(write_end)
        sources[read_end] = stream
    pump = OutputPump(sink, sources)
    pump.start()
    return pump


def _finish_capture(pump: OutputPump) -> None:
    """Close our ends of fds 1 and 2 and let the pump drain what is left."""
    pump.stopping.set()
    devnull = os.open(os.devnull, os.O_WRONLY)
    for fd in (1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    pump.join(0.2)


def run_function(sink: FrameSink, payload: str, user: str) -> str:
    try:
        func, args, kwargs = dill.loads(base64.b64decode(payload))
        value = func(*args, **kwargs)
    except BaseException as exc:  # noqa: BLE001 - every failure is the user's to see
        sink.send_output(
            {
                "type": "error",
                "ename": type(exc).__name__,
                "evalue": str(exc),
                "traceback": traceback.format_exception(exc),
            }
        )
        return "error"
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        sink.send_output(
            {
                "type": "error",
                "ename": "ResultNotJSON",
                "evalue": (
                    f"the function returned a {type(value).__module__}.{type(value).__qualname__}, "
                    f"which cannot be sent back as JSON ({exc}). Return plain dicts, lists, str, "
                    "int, float (finite), bool or None: e.g. array.tolist(), "
                    "dataclasses.asdict(obj), str(obj)."
                ),
                "traceback": [],
            }
        )
        return "error"
    sink.send({"type": "result", "value": value})
    return "ok"


def run_cell(sink: FrameSink, shell: CaptureShell, job: dict[str, Any]) -> str:
    shell.execution_count = 1
    if job.get("push"):
        try:
            shell.user_ns.update(dill.loads(base64.b64decode(job["push"])))
        except Exception as exc:  # noqa: BLE001 - any failure to load is the user's to see
            sink.send_output(
                {
                    "type": "error",
                    "ename": "PushError",
                    "evalue": f"the pushed variables could not be loaded as this user: {exc!r}",
                    "traceback": [],
                }
            )
            return "error"
    result = shell.run_cell(str(job.get("code", "")), store_history=True, silent=False)
    if job.get("pull"):
        sink.send({"type": "result", "value": pulled(shell.user_ns, job["pull"])})
    return "ok" if result.success else "error"


def pulled(namespace: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """The JSON-compatible values of ``names``; the rest are reported, not sent."""
    values, missing, not_json = {}, [], {}
    for name in names:
        if name not in namespace:
            missing.append(name)
            continue
        value = namespace[name]
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError):
            not_json[name] = f"{type(value).__module__}.{type(value).__qualname__}"
        else:
            values[name] = value
    return {"values": values, "missing": missing, "not_json": not_json}


def _prepare(job: dict[str, Any]) -> None:
    for entry in job.get("sys_path", []):
        if isinstance(entry, str) and entry not in sys.path:
            sys.path.append(entry)
    # Directory listings cached as root would claim modules the user cannot open:
    # forget them for the directories this user cannot read.
    for entry in sys.path:
        finder = sys.path_importer_cache.get(entry)
        if finder is not None and not os.access(entry, os.R_OK | os.X_OK):
            finder.invalidate_caches()
    sys.meta_path.append(UnreadableEnvironmentFinder)


def report(message: dict[str, Any]) -> None:
    """Send a frame about the child itself; the parent may already be gone."""
    try:
        protocol.write_frame(DATA_FD, message)
    except OSError:
        pass


def report_internal_error(exc: BaseException) -> None:
    """Tell the parent why pipefork itself failed in the child (a bug, not user code)."""
    report(
        {
            "type": "error",
            "ename": "PipeforkInternalError",
            "evalue": f"pipefork failed inside the child: {exc!r}; please report this",
            "traceback": traceback.format_exception(exc),
        }
    )


def child_main(request: dict[str, Any], forkserver_pid: int) -> int:
    """Entry point of a forked child; returns the exit status for ``os._exit``."""
    _reset_signals()
    target = TargetUser.from_json(request["user"])
    try:
        drop(
            target,
            keep_fds=[0, 1, 2, DATA_FD],
            rlimits=request["limits"]["rlimits"],
            parent_pid=forkserver_pid,
        )
    except (DropError, OSError) as exc:
        message = f"privilege drop to {target.name!r} failed, nothing was run: {exc}"
        report({"type": "error", "ename": "PrivilegeDropFailed", "evalue": message, "traceback": []})
        return DROP_FAILED
    # Only now, as the user, read the job. It comes straight from the caller: the
    # fork server never sees it, so its memory (which every later child inherits)
    # holds no one's code, environment or kernel key.
    job = protocol.read_frame(DATA_FD, MAX_JOB_BYTES)
    if job is None or job.get("type") != "job":
        return 2
    environment = clean_environment(target, job.get("env"))
    os.environ.clear()
    os.environ.update(environment)
    os.environ.setdefault("MPLBACKEND", INLINE_BACKEND)
    if job.get("kind") == "kernel":
        from .kernelapp import run_kernel

        return run_kernel(target, request, job)
    sink = FrameSink(DATA_FD, request["max_output_bytes"], request["max_frame_bytes"])
    sys.stdout = StreamCapture(sink, "stdout")
    sys.stderr = StreamCapture(sink, "stderr")
    try:
        os.chdir(request.get("cwd") or target.home)
    except OSError as exc:
        sink.send_output(
            {
                "type": "error",
                "ename": "WorkingDirectoryError",
                "evalue": f"cannot enter the working directory as {target.name!r}: {exc}",
                "traceback": [],
            }
        )
        sink.send({"type": "done", "status": "error"})
        return 0
    pump = _capture_std_fds(sink)
    _prepare(job)
    if job.get("kind") == "cell" and _shell is not None:
        _shell.attach(sink, target.name)
        status = run_cell(sink, _shell, job)
    else:
        if _shell is not None:
            _shell.attach(sink, target.name)
        status = run_function(sink, str(job.get("payload", "")), target.name)
    _finish_capture(pump)
    sink.send({"type": "done", "status": status})
    return 0
