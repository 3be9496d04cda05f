"""A client of the server extension's REST API, for callers that are not root.

A notebook whose kernel runs as a student, a grading script on another
account: they cannot fork as other users themselves, but the root-launched
server can, when its policy allows the caller.  ``RunClient`` posts the run,
relays the streamed outputs into the caller as they arrive (sanitized, as
another user's output is untrusted), and returns what ``run_cell_as`` /
``run_as`` would.
"""

from __future__ import annotations

import base64
import json
import os
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import dill

from .errors import CapacityError, PipeforkError, PolicyError, UnknownUserError
from .outputs import OutputCollector, relay_output
from .runner import OutputCallback, RunResult, unwrap
from .untrusted import sanitize_output

ERRORS_BY_STATUS = {403: PolicyError, 404: UnknownUserError, 429: CapacityError}


class RunClient:
    """Runs code as a user through ``POST {url}pipefork/api/runs``."""

    def __init__(self, url: str, token: str, *, trust_output: bool = False):
        self.url = url.rstrip("/") + "/"
        self.token = token
        self.trust_output = trust_output

    @classmethod
    def from_environment(cls) -> RunClient | None:
        """The client configured by ``PIPEFORK_URL`` and ``PIPEFORK_TOKEN``, if any."""
        url = os.environ.get("PIPEFORK_URL")
        return cls(url, os.environ.get("PIPEFORK_TOKEN", "")) if url else None

    def run_cell(
        self,
        code: str,
        *,
        user: str | None = None,
        path: str | None = None,
        timeout: float | None = None,
        cwd: str | None = None,
        on_output: OutputCallback | None = relay_output,
    ) -> RunResult:
        """Run cell source as ``user`` (or as the owner of notebook ``path``)."""
        return self._post({"code": code}, user, path, timeout, cwd, on_output)

    def run_function(
        self,
        func: Callable[..., Any],
        args: tuple = (),
        kwargs: dict[str, Any] | None = None,
        *,
        user: str | None = None,
        path: str | None = None,
        timeout: float | None = None,
        cwd: str | None = None,
        on_output: OutputCallback | None = relay_output,
    ) -> Any:
        """Call ``func`` as ``user`` on the server's side and return its JSON result."""
        payload = base64.b64encode(dill.dumps((func, tuple(args), dict(kwargs or {})), recurse=True))
        result = self._post({"function": payload.decode()}, user, path, timeout, cwd, on_output)
        return unwrap(result, timeout=timeout)

    def _post(
        self,
        body: dict[str, Any],
        user: str | None,
        path: str | None,
        timeout: float | None,
        cwd: str | None,
        on_output: OutputCallback | None,
    ) -> RunResult:
        if (user is None) == (path is None):
            raise PipeforkError("give exactly one of user= or path=")
        body.update({k: v for k, v in (("user", user), ("path", path), ("cwd", cwd)) if v is not None})
        if timeout is not None:
            body["timeout"] = timeout
        request = urllib.request.Request(
            self.url + "pipefork/api/runs",
            data=json.dumps(body).encode(),
            headers={"Authorization": f"token {self.token}", "Content-Type": "application/json"},
            method="POST",
        )
        collector = OutputCollector()
        try:
            with urllib.request.urlopen(request) as response:
                for line in response:
                    if not line.strip():
                        continue
                    item = json.loads(line)
                    if item.get("final"):
                        return self._result(item, collector)
                    output = sanitize_output(item, trust=self.trust_output)
                    collector.add(output)
                    if on_output is not None:
                        on_output(output)
        except urllib.error.HTTPError as exc:
            raise _error_from(exc) from None
        except urllib.error.URLError as exc:
            raise PipeforkError(f"cannot reach the pipefork server at {self.url}: {exc.reason}") from None
        raise PipeforkError("the server ended the response before the run's final line")

    @staticmethod
    def _result(final: dict[str, Any], collector: OutputCollector) -> RunResult:
        return RunResult(
            status=final["status"],
            user=final["user"],
            uid=final["uid"],
            outputs=collector.outputs,
            error=final.get("error"),
            result=final.get("result"),
            exit_code=final.get("exit_code"),
            signal=final.get("signal"),
            duration=final.get("duration", 0.0),
        )


def _error_from(exc: urllib.error.HTTPError) -> PipeforkError:
    try:
        message = json.loads(exc.read()).get("message") or exc.reason
    except ValueError:
        message = exc.reason
    return ERRORS_BY_STATUS.get(exc.code, PipeforkError)(
        f"the server refused the run ({exc.code}): {message}"
    )
