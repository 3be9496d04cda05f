"""pipefork: run Jupyter code as each person's own Unix user, from one root process.

The quickest way in::

    from pipefork_kernel import run_as, run_cell_as

    run_as("student1", whoami, args=(3,))
    run_cell_as("student1", "import os\\nos.getuid()").outputs

Both use one shared :class:`Engine`; create your own ``Engine(config=...)`` to
change settings.
"""

from __future__ import annotations

import atexit
import functools
import threading
from collections.abc import Callable
from typing import Any

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
    UnknownUserError,
)
from .outputs import relay_output
from .runner import Engine, OutputCallback, RunResult

__version__ = "0.1.0"

__all__ = [
    "CapacityError",
    "ChildCrashed",
    "Engine",
    "ForkServerError",
    "PipeforkError",
    "PolicyError",
    "ProtocolError",
    "RemoteError",
    "ResultNotJSON",
    "RunResult",
    "RunTimeout",
    "UnknownUserError",
    "arun_as",
    "arun_cell_as",
    "get_engine",
    "relay_output",
    "run_as",
    "run_cell_as",
    "set_engine",
]


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext pipefork_kernel``: the ``%%run_as`` / ``%run_as`` magics."""
    from .magics import RunAsMagics

    ipython.register_magics(RunAsMagics)


_engine: Engine | None = None
_engine_lock = threading.Lock()


def get_engine() -> Engine:
    """The engine shared by the module-level functions, created on first use."""
    global _engine
    with _engine_lock:
        if _engine is None:
            _engine = Engine()
            atexit.register(_engine.close)
        return _engine


def set_engine(engine: Engine) -> None:
    """Make ``engine`` the shared one (the server extension installs its own here,
    so owner kernels and runs share its fork server)."""
    global _engine
    with _engine_lock:
        _engine = engine


def run_as(
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
    options = {"timeout": timeout, "cwd": cwd, "env": env, "on_output": on_output}
    if func is None:

        def decorate(function: Callable[..., Any]) -> Callable[..., Any]:
            @functools.wraps(function)
            def as_user(*call_args: Any, **call_kwargs: Any) -> Any:
                return get_engine().run_as(user, function, call_args, call_kwargs, **options)

            return as_user

        return decorate
    return get_engine().run_as(user, func, args, kwargs, **options)


def run_cell_as(
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
    """Run cell source once as ``user`` in a fresh IPython shell; return a RunResult."""
    return get_engine().run_cell_as(
        user, code, timeout=timeout, cwd=cwd, env=env, on_output=on_output, push=push, pull=pull
    )


async def arun_as(
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
    """Coroutine form of :func:`run_as`."""
    return await get_engine().arun_as(
        user, func, args, kwargs, timeout=timeout, cwd=cwd, env=env, on_output=on_output
    )


async def arun_cell_as(
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
    """Coroutine form of :func:`run_cell_as`."""
    return await get_engine().arun_cell_as(user, code, timeout=timeout, cwd=cwd, env=env, on_output=on_output)
