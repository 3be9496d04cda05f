"""How fast is running code as another user with pipefork, next to its physical floor?

Run as root from the world-readable venv (target users must be able to read it)::

    /opt/pipefork/bin/python benchmarks/bench_engine.py [--user NAME] [--repeat N]

Every number in the printed table is measured in this one run, so ratios compare
like with like on whatever (noisy) machine this is.  The floor is a bare
``fork`` + ``_exit`` + ``waitpid`` in a *small* interpreter, and the thing
pipefork replaces is a fresh interpreter started as the user with ``runuser``.
The script only reports: goals that are not met are printed, never raised.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import time
from collections.abc import Awaitable, Callable
from typing import Any

import benchlib
from benchlib import PYTHON, Row, check_ok, make_engine, progress
from traitlets.config import Config

from pipefork_kernel import Engine

THROWAWAY_USER = "pfbench_user"
MB = 1_000_000
MiB = 1024 * 1024
#: Issue goals: run_as within 3x of a bare fork, a fresh ``runuser`` process at least 50x slower.
GOAL_RUN_AS_OVER_FORK = 3.0
GOAL_RUNUSER_OVER_RUN_AS = 50.0
#: Seconds a stream run may take before its engine kills it: the default 60 s could cut a slow one.
STREAM_TIMEOUT = 600.0

#: Forks timed inside a fresh interpreter: importing nothing keeps its page tables tiny,
#: which makes this the physical floor rather than a measure of this (bigger) script.
BARE_FORK_CODE = """
import json, os, sys, time
{imports}
warmup, repeat = int(sys.argv[1]), int(sys.argv[2])
times = []
for i in range(warmup + repeat):
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    if i >= warmup:
        times.append(time.perf_counter() - start)
print(json.dumps(times))
"""


def trivial() -> int:
    """The function ``run_as`` ships: its cost is all pipefork, none of it user work."""
    return 1


# --- timing -----------------------------------------------------------------------------


def _timed(func: Callable[[], Any], warmup: int, repeat: int) -> list[float]:
    """Call ``func`` ``warmup`` times unmeasured, then ``repeat`` times measured (seconds)."""
    for _ in range(warmup):
        func()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        func()
        times.append(time.perf_counter() - start)
    return times


async def _atimed(start: Callable[[], Awaitable[Any]], warmup: int, repeat: int) -> list[float]:
    """:func:`_timed` for coroutines, all in one loop: no per-call thread or loop set-up."""
    for _ in range(warmup):
        await start()
    times = []
    for _ in range(repeat):
        begin = time.perf_counter()
        await start()
        times.append(time.perf_counter() - begin)
    return times


def _within_budget(measure_once: Callable[[], float], repeat: int, budget: float) -> list[float]:
    """Up to ``repeat`` samples, none started after ``budget`` seconds, so a slow row still ends."""
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < repeat and (not samples or time.perf_counter() - start < budget):
        samples.append(measure_once())
    return samples


# --- the floor and the thing pipefork replaces ------------------------------------------


def bare_fork(repeat: int, imports: str = "") -> list[float]:
    """fork + _exit + waitpid timed inside a fresh interpreter, which reports them as JSON."""
    code = BARE_FORK_CODE.format(imports=imports)
    done = subprocess.run(
        [PYTHON, "-I", "-c", code, "10", str(repeat)], capture_output=True, text=True, check=True, cwd="/"
    )
    return json.loads(done.stdout)


def runuser_python(user: str) -> None:
    """A fresh interpreter as the user, importing what the fork server preloads."""
    subprocess.run(
        ["runuser", "-u", user, "--", PYTHON, "-c", "import IPython, dill"],
        check=True,
        cwd="/",
        stdin=subprocess.DEVNULL,
    )


# --- pipefork ---------------------------------------------------------------------------


async def throughput(engine: Engine, user: str, concurrency: int, total: int) -> float:
    """runs/s of ``total`` cells with at most ``concurrency`` in flight, on one engine."""
    gate = asyncio.Semaphore(concurrency)

    async def one() -> None:
        async with gate:
            check_ok(await engine.arun_cell_as(user, "1+1"))

    start = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(total)))
    return total / (time.perf_counter() - start)


def stream_cell(total_bytes: int) -> str:
    """A cell printing ``total_bytes`` in 1 KiB lines through sys.stdout, as user code would."""
    return (
        "import sys\n"
        "chunk = 'x' * 1023 + '\\n'\n"
        f"for _ in range({total_bytes // 1024}):\n"
        "    sys.stdout.write(chunk)\n"
    )


def stream_pipefork(engine: Engine, user: str, total_bytes: int) -> float:
    """MB/s of a child printing ``total_bytes``, counted as they reach ``on_output``."""
    received = 0

    def count(output: dict[str, Any]) -> None:
        nonlocal received
        if output["output_type"] == "stream":
            received += len(output["text"])

    start = time.perf_counter()
    result = engine.run_cell_as(user, stream_cell(total_bytes), on_output=count)
    elapsed = time.perf_counter() - start
    check_ok(result)
    if received != total_bytes // 1024 * 1024:
        raise SystemExit(f"streamed {received} bytes, expected {total_bytes}: output was dropped")
    return received / MB / elapsed


def stream_raw_pipe(total_bytes: int, chunk: int = 64 * 1024) -> float:
    """MB/s of os.pipe with a forked writer: what the kernel alone can move."""
    read_end, write_end = os.pipe()
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            block = memoryview(b"x" * chunk)
            left = total_bytes
            while left > 0:
                left -= os.write(write_end, block[: min(chunk, left)])
        finally:
            os._exit(0)
    os.close(write_end)
    received = 0
    while data := os.read(read_end, 1 << 20):
        received += len(data)
    os.close(read_end)
    os.waitpid(pid, 0)
    elapsed = time.perf_counter() - start
    if received != total_bytes:
        raise SystemExit(f"raw pipe moved {received} bytes, expected {total_bytes}")
    return received / MB / elapsed


# --- the measurements -------------------------------------------------------------------


def latency_rows(stack: contextlib.ExitStack, args: argparse.Namespace, user: str) -> dict[str, Row]:
    """Rows 1-4: one run at a time, each timed from the caller's side."""
    rows: dict[str, Row] = {}
    progress("bare fork in a small interpreter")
    rows["fork"] = Row("(1) bare fork+_exit+waitpid, small `python -c`", bare_fork(args.repeat * 4), "ms")
    rows["big_fork"] = Row(
        "(1b) bare fork+_exit+waitpid, `python -c` with IPython+dill imported",
        bare_fork(args.repeat * 4, imports="import IPython, dill"),
        "ms",
    )

    progress("starting a fork server; run_as")
    engine = make_engine(stack)
    rows["run_as"] = Row(
        "(2) `engine.run_as(user, trivial)`",
        _timed(lambda: engine.run_as(user, trivial), args.warmup, args.repeat),
        "ms",
    )
    # The sync API starts a thread and an event loop per call; this row shows what that costs.
    rows["arun_as"] = Row(
        "(2b) `await engine.arun_as(user, trivial)`, one event loop",
        asyncio.run(_atimed(lambda: engine.arun_as(user, trivial), args.warmup, args.repeat)),
        "ms",
    )
    progress("run_cell_as")
    rows["run_cell_as"] = Row(
        "(3) `engine.run_cell_as(user, '1+1')`",
        _timed(lambda: check_ok(engine.run_cell_as(user, "1+1")), args.warmup, args.repeat),
        "ms",
    )
    progress("runuser")
    rows["runuser"] = Row(
        "(4) `runuser -u USER -- python -c 'import IPython, dill'`",
        _timed(lambda: runuser_python(user), 1, args.runuser_repeat),
        "ms",
    )
    return rows


def throughput_rows(stack: contextlib.ExitStack, args: argparse.Namespace, user: str) -> list[Row]:
    """Row 5: many runs in flight on one engine, as a busy server would have them."""
    progress("throughput")
    config = Config()
    # One user carries every concurrent run here: lift the per-user cap (default 16).
    config.ForkServer.max_runs_per_user = max(args.concurrency)
    engine = make_engine(stack, config)
    asyncio.run(throughput(engine, user, max(args.concurrency), max(args.concurrency)))
    rows = []
    for level in args.concurrency:
        total = max(64, 4 * level)
        rates = [asyncio.run(throughput(engine, user, level, total)) for _ in range(args.rounds)]
        rows.append(Row(f"(5) throughput, {level} concurrent `arun_cell_as('1+1')`", rates, "runs/s"))
    return rows


def stream_rows(stack: contextlib.ExitStack, args: argparse.Namespace, user: str) -> list[Row]:
    """Rows 6-7: bandwidth of a loud cell next to what a bare pipe moves."""
    progress("streaming")
    total_bytes = args.stream_mib * MiB
    config = Config()
    config.RunLimits.max_output_bytes = total_bytes + MiB
    config.RunLimits.default_timeout = STREAM_TIMEOUT
    engine = make_engine(stack, config)
    check_ok(engine.run_cell_as(user, "1+1"))
    pipe = _within_budget(lambda: stream_raw_pipe(total_bytes), args.stream_repeat, args.stream_budget)
    loud = _within_budget(
        lambda: stream_pipefork(engine, user, total_bytes), args.stream_repeat, args.stream_budget
    )
    return [
        Row(f"(6) raw pipe, forked writer, {args.stream_mib} MiB", pipe, "MB/s"),
        Row(f"(7) pipefork cell printing {args.stream_mib} MiB → on_output", loud, "MB/s"),
    ]


def report(latency: dict[str, Row], others: list[Row], args: argparse.Namespace, user: str) -> None:
    benchlib.print_headline("pipefork engine benchmark", user, args.warmup)
    benchlib.print_table([*latency.values(), *others])
    run_as = latency["run_as"].median()
    fork_ratio = run_as / latency["fork"].median()
    runuser_ratio = latency["runuser"].median() / run_as
    print(
        f"- run_as / bare fork = {fork_ratio:.1f}x (goal ≤ {GOAL_RUN_AS_OVER_FORK:g}x): "
        f"{benchlib.verdict(fork_ratio <= GOAL_RUN_AS_OVER_FORK)}"
    )
    print(
        f"- runuser / run_as = {runuser_ratio:.1f}x (goal ≥ {GOAL_RUNUSER_OVER_RUN_AS:g}x): "
        f"{benchlib.verdict(runuser_ratio >= GOAL_RUNUSER_OVER_RUN_AS)}"
    )
    print(
        f"- for context, no goal: run_as / fork of an IPython-sized process (1b) = "
        f"{run_as / latency['big_fork'].median():.1f}x"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--user", help=f"existing user to run as (default: a throwaway {THROWAWAY_USER})")
    parser.add_argument("--repeat", type=int, default=40, help="measured runs per latency row (default 40)")
    parser.add_argument("--warmup", type=int, default=5, help="unmeasured runs before a row (default 5)")
    parser.add_argument("--runuser-repeat", type=int, default=8, help="measured runuser starts (default 8)")
    parser.add_argument(
        "--concurrency",
        type=lambda text: [int(part) for part in text.split(",")],
        default=[8, 32],
        help="comma-separated concurrency levels of the throughput rows (default 8,32)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="throughput rounds per level (default 3)")
    parser.add_argument("--stream-mib", type=int, default=100, help="MiB printed by the stream rows")
    parser.add_argument("--stream-repeat", type=int, default=3, help="runs per stream row (default 3)")
    parser.add_argument(
        "--stream-budget",
        type=float,
        default=10.0,
        help="seconds after which a stream row starts no further run (default 10; one always runs)",
    )
    args = parser.parse_args(argv)
    if min(args.repeat, args.runuser_repeat, args.rounds, args.stream_repeat, *args.concurrency) < 1:
        parser.error("repeat counts and concurrency levels must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # SIGTERM then stops the fork servers and removes the throwaway user, as Ctrl-C does.
    benchlib.start_as_root("it switches users (and may create one)")
    with benchlib.bench_user(args.user, THROWAWAY_USER) as user, contextlib.ExitStack() as engines:
        latency = latency_rows(engines, args, user)
        others = throughput_rows(engines, args, user) + stream_rows(engines, args, user)
        progress("closing engines")
    report(latency, others, args, user)


if __name__ == "__main__":
    main()
