"""Child side of an owner kernel: after the drop, become an IPython kernel.

The fork server's child calls :func:`run_kernel` once it *is* the notebook's
owner.  It writes its own copy of the connection file (0600, owned by the
owner, in a private directory), initializes IPKernelApp (modules are already
imported in the fork server, so this is fast), reports ``kernel_ready`` or the
start-up error over the pipe, and then serves like any IPython kernel.

Run as ``python -m pipefork_kernel.kernelapp`` (the kernelspec's argv, used
only when a client ignores kernel provisioners) it refuses to start: a
pipefork kernel exists only through its provisioner.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile
import traceback
from typing import Any

from ipykernel.kernelapp import IPKernelApp
from IPython.core.interactiveshell import InteractiveShell
from traitlets.config import Config

from .child import DATA_FD, report
from .users import TargetUser


def _write_connection_file(info: dict[str, Any]) -> tuple[str, str]:
    runtime = tempfile.mkdtemp(prefix="pipefork-kernel-")
    path = os.path.join(runtime, "kernel.json")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(info, f)
    return runtime, path


def _app(connection_file: str, target: TargetUser) -> IPKernelApp:
    # The fork server's one-shot shell is a singleton; the kernel makes its own.
    InteractiveShell.clear_instance()
    config = Config()
    config.InteractiveShell.banner2 = (
        f"pipefork: this kernel runs as Unix user {target.name!r} (uid {target.uid}).\n"
    )
    return IPKernelApp.instance(config=config, connection_file=connection_file)


def run_kernel(target: TargetUser, request: dict[str, Any], job: dict[str, Any]) -> int:
    """Serve as an IPython kernel until shut down; returns the exit status."""
    cwd = request.get("cwd")
    try:
        os.chdir(cwd if cwd and os.access(cwd, os.X_OK) else target.home)
    except OSError as exc:
        report(
            {
                "type": "error",
                "ename": "WorkingDirectoryError",
                "evalue": f"neither {cwd!r} nor the home directory is usable by {target.name!r}: {exc}",
                "traceback": [],
            }
        )
        return 1
    runtime, connection_file = _write_connection_file(job["connection_info"])
    try:
        app = _app(connection_file, target)
        app.initialize([])
    except BaseException as exc:  # noqa: BLE001 - every start-up failure goes to the person
        report(
            {
                "type": "error",
                "ename": type(exc).__name__,
                "evalue": f"the kernel could not start as {target.name!r}: {exc}",
                "traceback": traceback.format_exception(exc),
            }
        )
        shutil.rmtree(runtime, ignore_errors=True)
        return 1
    report({"type": "kernel_ready", "pid": os.getpid()})
    os.close(DATA_FD)
    # jupyter_client terminates a kernel that is slow to shut down (one with
    # children, say): exit through Python so the connection file is removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        app.start()
    finally:
        shutil.rmtree(runtime, ignore_errors=True)
    return 0


def main() -> None:
    sys.exit(
        "The pipefork kernel is started by its kernel provisioner (pipefork-provisioner), "
        "which forks it as the notebook's owner. This client ignored the provisioner; "
        "upgrade jupyter_client to 7.0 or newer."
    )


if __name__ == "__main__":
    main()
