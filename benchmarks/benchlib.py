"""What the ``bench_*.py`` scripts share: the report table, the benchmark user, root set-up.

The scripts are run as files (``python benchmarks/bench_engine.py``), which puts
this directory on ``sys.path``: they import this module as ``benchlib``, no
package or ``python -m`` needed.  Nothing here is meant to be shipped to a run
as another user (``engine.run_as``): dill sends a function of an importable
module by reference, and the forked child cannot count on importing ``benchlib``.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import signal
import statistics
import subprocess
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from traitlets.config import Config

from pipefork_kernel import Engine, RunResult

#: The world-readable venv: a user a run switches to must be able to read the interpreter.
PYTHON = "/opt/pipefork/bin/python"
#: Seconds to milliseconds.
MS = 1000.0


# --- the report -------------------------------------------------------------------------


@dataclass
class Row:
    """One line of the table.

    ``samples`` are seconds when the unit is ``ms`` (shown in ms), rates when it
    ends in ``/s`` (runs/s, MB/s), and otherwise amounts shown as they are (MiB).
    """

    label: str
    samples: list[float]
    unit: str

    @property
    def is_rate(self) -> bool:
        return self.unit.endswith("/s")

    def median(self) -> float:
        return statistics.median(self.samples)

    def p90(self) -> float:
        """The slow (or big) end: the 90th percentile, which for a rate is its 10th percentile."""
        if len(self.samples) < 2:
            return self.samples[0]
        deciles = statistics.quantiles(self.samples, n=10, method="inclusive")
        return deciles[0] if self.is_rate else deciles[8]

    def markdown(self) -> str:
        scale = MS if self.unit == "ms" else 1.0
        median, p90 = _fmt(self.median() * scale), _fmt(self.p90() * scale)
        return f"| {self.label} | {len(self.samples)} | {median} | {p90} | {self.unit} |"


def _fmt(value: float) -> str:
    """Digits that mean something at that size; by magnitude, so a negative difference reads alike."""
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def print_headline(title: str, user: str, warmup: int, versions: Sequence[str] = ()) -> None:
    """The report's first line: what the numbers depend on (machine, Python, other ``versions``)."""
    python = sys.version.split()[0]
    parts = [f"user {user}", f"{os.cpu_count()} CPUs", f"python {python}", *versions, f"warmup {warmup}"]
    print(f"{title}: {', '.join(parts)}\n")


def print_table(rows: Iterable[Row]) -> None:
    """The rows as one markdown table, then a blank line before the goal lines."""
    print("| measurement | n | median | p90 | unit |")
    print("| --- | ---: | ---: | ---: | --- |")
    for row in rows:
        print(row.markdown())
    print()


def verdict(met: bool) -> str:
    """How a goal line ends: the scripts report goals, they never fail on them."""
    return "met" if met else "NOT met"


def progress(text: str) -> None:
    """Progress goes to stderr so stdout is only the report, ready to paste."""
    print(f"... {text}", file=sys.stderr, flush=True)


# --- set-up -----------------------------------------------------------------------------


def start_as_root(why: str) -> None:
    """Refuse to start unless root (saying ``why``), then make SIGTERM unwind like Ctrl-C.

    Called before anything is created: every ``with`` and ``finally`` then also
    cleans up on ``kill``, so no throwaway user, server or fork server is left.
    """
    if os.geteuid() != 0:
        raise SystemExit(f"run this as root: {why}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


@contextlib.contextmanager
def bench_user(name: str | None, throwaway: str) -> Iterator[str]:
    """The given user, or ``throwaway`` created now and removed afterwards (even on Ctrl-C).

    Each script has its own ``throwaway`` name, so two different benchmarks can
    run at once; the same one twice is refused rather than share an account.
    """
    if name is not None:
        try:
            pwd.getpwnam(name)
        except KeyError:
            raise SystemExit(f"no such user: {name!r}") from None
        yield name
        return
    try:
        pwd.getpwnam(throwaway)
    except KeyError:
        pass
    else:
        # Never delete an account this run did not create.
        raise SystemExit(
            f"user {throwaway!r} already exists (another benchmark is running, or a killed one "
            f"left it): pass --user NAME, or remove it with `userdel -r {throwaway}`"
        )
    subprocess.run(["useradd", "-m", throwaway], check=True)
    try:
        yield throwaway
    finally:
        subprocess.run(["userdel", "-r", throwaway], check=False, capture_output=True)


def make_engine(stack: contextlib.ExitStack, config: Config | None = None) -> Engine:
    """An engine (with its own fork server) closed with the stack, so none outlives the script."""
    engine = Engine(config=config or Config())
    stack.callback(engine.close)
    return engine


def check_ok(result: RunResult) -> None:
    """A run that failed would time the failure path: refuse to report it."""
    if result.status != "ok":
        raise SystemExit(f"benchmark run failed: {result.status} {result.error}")
