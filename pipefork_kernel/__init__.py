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
import inspect
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
from .runner import Engine, RunResult

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


def _on_shared_engine(method: Callable[..., Any]) -> Callable[..., Any]:
    """The module-level twin of an ``Engine`` method, called on the shared engine."""
    name = method.__name__
    if inspect.iscoroutinefunction(method):

        async def call(*args: Any, **kwargs: Any) -> Any:
            return await getattr(get_engine(), name)(*args, **kwargs)

    else:

        def call(*args: Any, **kwargs: Any) -> Any:
            return getattr(get_engine(), name)(*args, **kwargs)

    functools.update_wrapper(call, method)
    call.__qualname__ = name
    call.__module__ = __name__
    signature = inspect.signature(method)
    call.__signature__ = signature.replace(parameters=list(signature.parameters.values())[1:])
    return call


run_as = _on_shared_engine(Engine.run_as)
run_cell_as = _on_shared_engine(Engine.run_cell_as)
arun_as = _on_shared_engine(Engine.arun_as)
arun_cell_as = _on_shared_engine(Engine.arun_cell_as)
