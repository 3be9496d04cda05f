"""The REST API: POST runs (streamed as NDJSON), GET status and whoami."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from jupyter_server.auth.decorator import authorized
from jupyter_server.base.handlers import APIHandler
from jupyter_server.extension.handler import ExtensionHandlerMixin
from tornado import web

from pipefork_kernel import CapacityError, PipeforkError
from pipefork_kernel.runner import cell_job

from .app import RunRecord

AUTH_RESOURCE = "pipefork"


@dataclass(frozen=True)
class RunRequest:
    """A validated body of ``POST /pipefork/api/runs``."""

    kind: str
    payload: str
    path: str | None
    user: str | None
    timeout: float | None
    cwd: str | None

    @property
    def sha256(self) -> str:
        data = base64.b64decode(self.payload) if self.kind == "function" else self.payload.encode()
        return hashlib.sha256(data).hexdigest()

    def job(self) -> dict[str, Any]:
        if self.kind == "code":
            return cell_job(self.payload, None, None)
        # The bytes are handed to the child as they came: root never loads them.
        return {"type": "job", "kind": "function", "payload": self.payload, "sys_path": []}


def parse_run_request(body: bytes, max_bytes: int, max_timeout: float) -> RunRequest:
    """Validate a request body, or raise the HTTP error that says what is wrong."""
    if len(body) > max_bytes:
        raise web.HTTPError(413, f"request of {len(body)} bytes is over the limit of {max_bytes} bytes")
    try:
        data = json.loads(body or b"null")
    except ValueError as exc:
        raise web.HTTPError(400, f"the body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise web.HTTPError(400, "the body must be a JSON object")
    unknown = set(data) - {"code", "function", "path", "user", "timeout", "cwd"}
    if unknown:
        raise web.HTTPError(400, f"unknown fields {sorted(unknown)}")
    if ("code" in data) == ("function" in data):
        raise web.HTTPError(400, "give exactly one of 'code' (cell source) or 'function' (base64 dill)")
    if ("path" in data) == ("user" in data):
        raise web.HTTPError(400, "give exactly one of 'path' (run as its owner) or 'user'")
    kind = "code" if "code" in data else "function"
    payload = data[kind]
    if not isinstance(payload, str):
        raise web.HTTPError(400, f"'{kind}' must be a string")
    if kind == "function":
        try:
            base64.b64decode(payload, validate=True)
        except binascii.Error:
            raise web.HTTPError(
                400, "'function' must be base64 (of dill.dumps((func, args, kwargs)))"
            ) from None
    for key in ("path", "user", "cwd"):
        if key in data and not isinstance(data[key], str):
            raise web.HTTPError(400, f"'{key}' must be a string")
    timeout = data.get("timeout")
    if timeout is not None:
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
            raise web.HTTPError(400, "'timeout' must be a positive number of seconds")
        if timeout > max_timeout:
            raise web.HTTPError(400, f"'timeout' may be at most {max_timeout} s on this server")
    return RunRequest(kind, payload, data.get("path"), data.get("user"), timeout, data.get("cwd"))


class PipeforkHandler(ExtensionHandlerMixin, APIHandler):
    auth_resource = AUTH_RESOURCE

    @property
    def pipefork(self) -> Any:
        return self.extensionapp


class RunsHandler(PipeforkHandler):
    """``POST /pipefork/api/runs``: run code or a function as a user, streaming NDJSON."""

    run_task: asyncio.Future | None = None

    @web.authenticated
    @authorized
    async def post(self) -> None:
        app = self.pipefork
        identity = self.current_user.username
        received = time.time()
        audit = {"identity": identity, "start": received, "path": None, "user": None, "uid": None}
        try:
            request = parse_run_request(self.request.body, app.max_request_bytes, app.max_timeout)
            audit.update(path=request.path, kind=request.kind, sha256=request.sha256)
            target, _ = app.resolve_target(self.current_user, request.path, request.user)
        except web.HTTPError as exc:
            app.audit.record(
                **{"kind": "code", "sha256": None, **audit},
                duration=time.time() - received,
                status="refused",
                reason=exc.log_message,
            )
            raise
        audit.update(user=target.name, uid=target.uid)
        cwd = request.cwd
        if cwd is None and request.path is not None:
            cwd = app.notebook_owner(request.path)[0].rsplit("/", 1)[0]
        self.set_header("Content-Type", "application/x-ndjson")
        self.set_header("Cache-Control", "no-cache")

        def emit(output: dict[str, Any]) -> None:
            self.write(json.dumps(output) + "\n")
            self.flush()

        timeout = request.timeout if request.timeout is not None else app.default_timeout
        self.run_task = asyncio.ensure_future(
            app.engine.arun(target.name, request.job(), timeout=timeout, cwd=cwd, on_output=emit)
        )
        app.active[id(self)] = RunRecord(identity, target.name, request.kind)
        stop_watching = self._watch_disconnect(self.run_task)
        try:
            result = await self.run_task
        except CapacityError as exc:
            app.audit.record(**audit, duration=time.time() - received, status="refused", reason=str(exc))
            raise web.HTTPError(429, str(exc)) from None
        except asyncio.CancelledError:
            app.done_by_status["cancelled"] += 1
            app.audit.record(
                **audit, duration=time.time() - received, status="cancelled", reason="client disconnected"
            )
            return
        except PipeforkError as exc:
            app.audit.record(**audit, duration=time.time() - received, status="error", reason=str(exc))
            raise web.HTTPError(500, str(exc)) from None
        finally:
            stop_watching()
            app.active.pop(id(self), None)
        app.done_by_status[result.status] += 1
        app.audit.record(
            **audit,
            duration=time.time() - received,
            status=result.status,
            reason=(result.error or {}).get("evalue"),
        )
        self.finish(json.dumps({"final": True, **result.to_json()}) + "\n")

    def _watch_disconnect(self, task: asyncio.Future) -> Callable[[], None]:
        """Cancel ``task`` when the client hangs up, even while the run prints nothing.

        Tornado notices a closed connection only when it writes; a quiet run
        would go on for nobody.  Watch a duplicate of the socket (so tornado's
        own registration is untouched) and peek: EOF means the client is gone.
        """
        loop = asyncio.get_running_loop()
        watched = socket.socket(fileno=os.dup(self.request.connection.stream.socket.fileno()))

        def check() -> None:
            try:
                data = watched.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            stop()
            if not data and not task.done():
                task.cancel()

        def stop() -> None:
            if watched.fileno() != -1:
                loop.remove_reader(watched.fileno())
                watched.close()

        loop.add_reader(watched.fileno(), check)
        return stop


class StatusHandler(PipeforkHandler):
    """``GET /pipefork/api/status``: fork server health, runs, and the policy in force."""

    @web.authenticated
    @authorized
    async def get(self) -> None:
        self.finish(json.dumps(await asyncio.to_thread(self.pipefork.status)))


class WhoamiHandler(PipeforkHandler):
    """``GET /pipefork/api/whoami[?path=P]``: who you are and whom a run would be."""

    @web.authenticated
    @authorized
    async def get(self) -> None:
        app = self.pipefork
        user = self.current_user
        path = self.get_query_argument("path", None)
        answer: dict[str, Any] = {
            "identity": user.username,
            "admin": app.is_admin(user),
            "path": path,
            "user": app.run_policy.unix_name(user.username),
        }
        try:
            target, decision = app.resolve_target(user, path, None if path else answer["user"])
            answer.update(user=target.name, uid=target.uid, allowed=True, reason=decision.reason)
        except web.HTTPError as exc:
            if path is not None and exc.status_code == 404:
                raise
            answer.update(allowed=False, reason=exc.log_message)
        self.finish(json.dumps(answer))
