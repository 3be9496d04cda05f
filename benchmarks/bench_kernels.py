"""How does an owner kernel (``pipefork`` kernelspec) compare with a stock ``python3`` kernel?

Run as root from the world-readable venv (the notebook owner must be able to read it)::

    /opt/pipefork/bin/python benchmarks/bench_kernels.py [--user NAME] [--repeat N]

Both kernelspecs are measured in this one run, interleaved, so ratios compare like
with like on whatever (noisy) machine this is: the time from the start request to
the first ``kernel_info`` reply, the ``execute`` round trip of ``1+1``, and the
private memory of an idle kernel.  The pipefork kernel runs as the owner of a
notebook under /var/tmp, forked from the shared engine's fork server; the stock
kernel is a fresh ``python -m ipykernel_launcher`` from the same venv, as root.
The script only reports: goals that are not met are printed, never raised.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pwd
import queue
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

import benchlib
from benchlib import Row, progress
from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.manager import KernelManager

import pipefork_kernel

THROWAWAY_USER = "pfbench_kernel"
STOCK, PIPEFORK = "python3", "pipefork"
KINDS = (STOCK, PIPEFORK)
KiB_PER_MiB = 1024
#: Issue goals: a start at most a quarter of a stock one, execute within 10%, half the memory.
GOAL_START_FRACTION = 0.25
GOAL_EXECUTE_SLOWDOWN = 1.10
GOAL_MEMORY_FRACTION = 0.5
#: Cells an idle kernel has run before its memory is read: a used kernel, not a pristine one.
TRIVIAL_CELLS = ("1+1", "x = [i * i for i in range(100)]", "print(sum(x))")
#: Seconds for a kernel to answer; far above any healthy figure, so only a hang hits it.
TIMEOUT = 60.0


# --- kernels ----------------------------------------------------------------------------


@dataclass
class Kernel:
    """A started kernel, its client, and how long its start took (seconds)."""

    kind: str
    manager: KernelManager
    client: BlockingKernelClient
    launched: float
    first_reply: float

    @property
    def pid(self) -> int:
        return int(self.manager.provisioner.pid)

    def close(self) -> None:
        self.client.stop_channels()
        if self.manager.has_kernel:
            self.manager.shutdown_kernel(now=True)


def start(kind: str, notebook: str) -> Kernel:
    """Start a kernel the way Jupyter Server does for ``notebook``, timing it to first reply."""
    env = {**os.environ, "JPY_SESSION_NAME": notebook}
    begin = time.perf_counter()
    manager = KernelManager(kernel_name=kind)
    # A forked kernel's stdout and stderr are /dev/null; give the stock one the same (and a quiet terminal).
    manager.start_kernel(
        cwd=os.path.dirname(notebook), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    launched = time.perf_counter() - begin
    client = manager.client()
    try:
        client.start_channels()
        wait_for_kernel_info(manager, client)
        first_reply = time.perf_counter() - begin
        wait_for_iopub(client)
    except BaseException:
        client.stop_channels()
        manager.shutdown_kernel(now=True)
        raise
    return Kernel(kind, manager, client, launched, first_reply)


def wait_for_kernel_info(manager: KernelManager, client: BlockingKernelClient) -> None:
    """Return at the first ``kernel_info_reply``, as ``wait_for_ready`` would, minus its fixed waits.

    ``wait_for_ready`` also insists on an iopub message and then drains iopub until
    0.2 s pass in silence, a constant that would only blur the comparison.
    """
    deadline = time.monotonic() + TIMEOUT
    while True:
        client.kernel_info()
        with contextlib.suppress(queue.Empty):
            while True:
                if client.get_shell_msg(timeout=1.0)["msg_type"] == "kernel_info_reply":
                    return
        if not manager.is_alive():
            raise SystemExit(f"the {manager.kernel_name} kernel died before replying to kernel_info")
        if time.monotonic() > deadline:
            raise SystemExit(f"the {manager.kernel_name} kernel did not reply within {TIMEOUT} s")


def wait_for_iopub(client: BlockingKernelClient) -> None:
    """Untimed: wait until iopub is subscribed (a fast kernel can publish before it is), then drain it.

    Until then the kernel's iopub messages are lost, and :func:`execute` would wait
    for an ``idle`` status that never comes.
    """
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        client.kernel_info()
        with contextlib.suppress(queue.Empty):
            client.get_iopub_msg(timeout=0.2)
            break
    else:
        raise SystemExit(f"no iopub message from the kernel within {TIMEOUT} s")
    with contextlib.suppress(queue.Empty):
        while True:
            client.get_iopub_msg(timeout=0.05)
    with contextlib.suppress(queue.Empty):
        while True:
            client.get_shell_msg(timeout=0)


def execute(kernel: Kernel, code: str) -> float:
    """Seconds from sending ``execute`` to its reply; then wait (untimed) until the kernel is idle."""
    client = kernel.client
    begin = time.perf_counter()
    msg_id = client.execute(code)
    while True:
        reply = client.get_shell_msg(timeout=TIMEOUT)
        if reply["parent_header"].get("msg_id") == msg_id:
            break
    elapsed = time.perf_counter() - begin
    if reply["content"]["status"] != "ok":
        raise SystemExit(f"{code!r} failed in the {kernel.kind} kernel: {reply['content']}")
    while True:
        message = client.get_iopub_msg(timeout=TIMEOUT)
        if (
            message["msg_type"] == "status"
            and message["content"]["execution_state"] == "idle"
            and message["parent_header"].get("msg_id") == msg_id
        ):
            return elapsed


def smaps_rollup(pid: int) -> dict[str, float]:
    """Rss, Pss and private (USS = Private_Clean + Private_Dirty) memory of ``pid``, in MiB."""
    fields: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                fields[parts[0].rstrip(":")] = int(parts[1])
    private = fields["Private_Clean"] + fields["Private_Dirty"] + fields.get("Private_Hugetlb", 0)
    return {
        "rss": fields["Rss"] / KiB_PER_MiB,
        "pss": fields["Pss"] / KiB_PER_MiB,
        "uss": private / KiB_PER_MiB,
    }


# --- files ------------------------------------------------------------------------------


@contextlib.contextmanager
def notebook_of(user: str) -> Iterator[str]:
    """A notebook owned by ``user`` in a directory of its own under /var/tmp, removed afterwards."""
    entry = pwd.getpwnam(user)
    folder = tempfile.mkdtemp(prefix="pfbench-kernels-", dir="/var/tmp")
    try:
        os.chown(folder, entry.pw_uid, entry.pw_gid)
        path = os.path.join(folder, "bench.ipynb")
        with open(path, "w") as f:
            f.write("{}")
        os.chown(path, entry.pw_uid, entry.pw_gid)
        yield path
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# --- the measurements -------------------------------------------------------------------


@dataclass
class Samples:
    """Everything measured for one kernelspec."""

    launched: list[float]
    first_reply: list[float]
    execute: list[float]
    memory: list[dict[str, float]]


def measure(args: argparse.Namespace, notebook: str) -> tuple[float, dict[str, Samples], dict[str, float]]:
    """The cold start, then interleaved starts, round trips and memory of both kernelspecs."""
    samples = {kind: Samples([], [], [], []) for kind in KINDS}
    with contextlib.ExitStack() as kernels:
        progress("cold start: the first pipefork kernel also starts the fork server")
        cold = start(PIPEFORK, notebook)
        cold.close()
        progress(f"warm-up: {args.warmup} start(s) of each kernelspec")
        for _ in range(args.warmup):
            for kind in KINDS:
                start(kind, notebook).close()
        progress(
            f"{args.repeat} starts of each kernelspec, interleaved; memory after {len(TRIVIAL_CELLS)} cells"
        )
        for _ in range(args.repeat):
            for kind in KINDS:
                kernel = start(kind, notebook)
                try:
                    for cell in TRIVIAL_CELLS:
                        execute(kernel, cell)
                    time.sleep(args.settle)
                    samples[kind].memory.append(smaps_rollup(kernel.pid))
                finally:
                    kernel.close()
                samples[kind].launched.append(kernel.launched)
                samples[kind].first_reply.append(kernel.first_reply)
        progress(f"{args.round_trips} execute round trips on one kernel of each kernelspec, interleaved")
        live = {}
        for kind in KINDS:
            live[kind] = start(kind, notebook)
            kernels.callback(live[kind].close)
        for _ in range(args.warmup * 10):
            for kind in KINDS:
                execute(live[kind], "1+1")
        for _ in range(args.round_trips):
            for kind in KINDS:
                samples[kind].execute.append(execute(live[kind], "1+1"))
        forkserver_pid = pipefork_kernel.get_engine().forkserver.pid
        forkserver = smaps_rollup(forkserver_pid) if forkserver_pid else {}
        progress("shutting kernels down")
    return cold.first_reply, samples, forkserver


def report(
    cold: float,
    samples: dict[str, Samples],
    forkserver: dict[str, float],
    args: argparse.Namespace,
    user: str,
) -> None:
    stock, pf = samples[STOCK], samples[PIPEFORK]
    mem = {
        kind: {key: [m[key] for m in samples[kind].memory] for key in ("uss", "pss", "rss")} for kind in KINDS
    }
    rows = {
        "start_stock": Row("(1) start → first `kernel_info` reply, stock `python3`", stock.first_reply, "ms"),
        "start_pf": Row(
            "(1) start → first `kernel_info` reply, `pipefork` (warm fork server)", pf.first_reply, "ms"
        ),
        "cold": Row("(1c) first `pipefork` start, fork server started with it (cold)", [cold], "ms"),
        "launch_stock": Row("(1b) of which `start_kernel()` returns, stock", stock.launched, "ms"),
        "launch_pf": Row("(1b) of which `start_kernel()` returns, `pipefork`", pf.launched, "ms"),
        "exec_stock": Row("(2) execute `1+1` → execute_reply, stock", stock.execute, "ms"),
        "exec_pf": Row("(2) execute `1+1` → execute_reply, `pipefork`", pf.execute, "ms"),
        "uss_stock": Row("(3) idle kernel private memory (USS), stock", mem[STOCK]["uss"], "MiB"),
        "uss_pf": Row("(3) idle kernel private memory (USS), `pipefork`", mem[PIPEFORK]["uss"], "MiB"),
        "pss_stock": Row("(3b) idle kernel PSS, stock", mem[STOCK]["pss"], "MiB"),
        "pss_pf": Row(
            "(3b) idle kernel PSS, `pipefork` (shares with the fork server)", mem[PIPEFORK]["pss"], "MiB"
        ),
        "rss_stock": Row("(3b) idle kernel RSS, stock", mem[STOCK]["rss"], "MiB"),
        "rss_pf": Row("(3b) idle kernel RSS, `pipefork`", mem[PIPEFORK]["rss"], "MiB"),
    }
    if forkserver:
        rows["fs_uss"] = Row("(3c) fork server USS, paid once for all kernels", [forkserver["uss"]], "MiB")
        rows["fs_rss"] = Row("(3c) fork server RSS", [forkserver["rss"]], "MiB")
    benchlib.print_headline("pipefork owner kernel benchmark", user, args.warmup)
    benchlib.print_table(rows.values())
    start_ratio = rows["start_pf"].median() / rows["start_stock"].median()
    exec_ratio = rows["exec_pf"].median() / rows["exec_stock"].median()
    mem_ratio = rows["uss_pf"].median() / rows["uss_stock"].median()
    print(
        f"- pipefork start / stock start = {start_ratio:.3f} (goal ≤ {GOAL_START_FRACTION:g}): "
        f"{benchlib.verdict(start_ratio <= GOAL_START_FRACTION)}"
    )
    print(
        f"- pipefork execute / stock execute = {exec_ratio:.3f} (goal ≤ {GOAL_EXECUTE_SLOWDOWN:g}): "
        f"{benchlib.verdict(exec_ratio <= GOAL_EXECUTE_SLOWDOWN)}"
    )
    print(
        f"- pipefork idle USS / stock idle USS = {mem_ratio:.3f} (goal ≤ {GOAL_MEMORY_FRACTION:g}): "
        f"{benchlib.verdict(mem_ratio <= GOAL_MEMORY_FRACTION)}"
    )
    cold_ratio = cold / rows["start_stock"].median()
    pss_ratio = rows["pss_pf"].median() / rows["pss_stock"].median()
    print(
        f"- for context, no goal: cold pipefork start / stock start = {cold_ratio:.3f}; "
        f"pipefork idle PSS / stock idle PSS = {pss_ratio:.3f}"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--user", help=f"existing user to own the notebook (default: a throwaway {THROWAWAY_USER})"
    )
    parser.add_argument("--repeat", type=int, default=20, help="measured starts per kernelspec (default 20)")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured starts per kernelspec (default 1)")
    parser.add_argument(
        "--round-trips",
        type=int,
        default=200,
        help="measured execute round trips per kernelspec (default 200)",
    )
    parser.add_argument(
        "--settle", type=float, default=0.2, help="seconds an idle kernel rests before its memory is read"
    )
    args = parser.parse_args(argv)
    if min(args.repeat, args.round_trips) < 1 or args.warmup < 0:
        parser.error("--repeat and --round-trips must be at least 1, --warmup at least 0")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # SIGTERM then stops the kernels and the fork server and removes the throwaway user, as Ctrl-C does.
    benchlib.start_as_root("it forks kernels as another user (and may create one)")
    with benchlib.bench_user(args.user, THROWAWAY_USER) as user, notebook_of(user) as notebook:
        try:
            cold, samples, forkserver = measure(args, notebook)
        finally:
            progress("stopping the fork server")
            pipefork_kernel.get_engine().close()
    report(cold, samples, forkserver, args, user)


if __name__ == "__main__":
    main()
