"""What does the REST API add to a run, next to the engine called directly?

Run as root from the world-readable venv (target users must be able to read it)::

    /opt/pipefork/bin/python benchmarks/bench_rest.py [--user NAME] [--repeat N]

It starts a real Jupyter Server with the pipefork extension on 127.0.0.1 (a
random token, a free port, a temporary root_dir) and, in this one run, times a
trivial cell (``1+1``) sent to ``POST /pipefork/api/runs`` over one keep-alive
HTTP connection, next to the same cell run by this script's own ``Engine``.
The latency rows are interleaved round by round, so a noisy neighbour slows
both sides alike.  Then 16 clients (16 connections) hammer the REST API, next
to 16 concurrent ``arun_cell_as`` on the direct engine.  The server and this
script each have their own fork server.  The script only reports: goals that
are not met are printed, never raised.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import itertools
import json
import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import benchlib
import jupyter_server
import tornado
from benchlib import MS, PYTHON, Row, check_ok, make_engine, progress
from traitlets.config import Config

from pipefork_kernel import Engine, RunResult

THROWAWAY_USER = "pfbench_rest"
CODE = "1+1"
#: Issue goal: a REST run at most this many milliseconds over the direct call.
GOAL_REST_OVERHEAD_MS = 3.0
#: Seconds for the server to answer ``GET /api/status`` after it was started.
START_TIMEOUT = 90.0
#: Seconds for the server to exit after ``POST /api/shutdown`` (then SIGTERM, then SIGKILL).
STOP_TIMEOUT = 15.0
#: Seconds one HTTP request may take: far above any healthy figure, so only a hang hits it.
HTTP_TIMEOUT = 60.0


# --- the server -------------------------------------------------------------------------


@dataclass
class Server:
    """A running Jupyter Server: where it listens, its token, and its own fork server's pid."""

    process: subprocess.Popen
    port: int
    token: str
    log_path: str
    forkserver_pid: int = 0

    def connect(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=HTTP_TIMEOUT)

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"token {self.token}"}

    def log_tail(self, lines: int = 30) -> str:
        with open(self.log_path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])


def free_port() -> int:
    """A port nobody listens on now (the server is told not to retry another one)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def get_json(server: Server, path: str) -> tuple[int, Any]:
    """One GET on a fresh connection: (status, decoded body or None)."""
    conn = server.connect()
    try:
        conn.request("GET", path, headers=server.headers())
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    try:
        return response.status, json.loads(body)
    except ValueError:
        return response.status, None


def wait_until_up(server: Server) -> None:
    """Poll ``GET /api/status`` until it answers 200; fail with the server's log otherwise."""
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if server.process.poll() is not None:
            raise SystemExit(
                f"the Jupyter Server exited with {server.process.returncode}:\n{server.log_tail()}"
            )
        with contextlib.suppress(OSError, http.client.HTTPException):
            if get_json(server, "/api/status")[0] == 200:
                return
        if time.monotonic() > deadline:
            raise SystemExit(f"no answer from /api/status after {START_TIMEOUT:g} s:\n{server.log_tail()}")
        time.sleep(0.1)


@contextlib.contextmanager
def jupyter_server_running(concurrency: int) -> Iterator[Server]:
    """A root Jupyter Server with the extension, stopped (with its fork server) on the way out.

    The token goes in the environment (``JUPYTER_TOKEN``), which only root can
    read, rather than on the command line, which every local user can: with
    the default policy the token holder may run code as anyone.
    """
    folder = tempfile.mkdtemp(prefix="pfbench-rest-")  # mode 0700: the log and runtime files name the token
    root_dir = os.path.join(folder, "root")
    os.mkdir(root_dir)
    port, token = free_port(), secrets.token_hex(24)
    env = {**os.environ, "JUPYTER_TOKEN": token, "JUPYTER_RUNTIME_DIR": os.path.join(folder, "runtime")}
    command = [
        PYTHON,
        "-m",
        "jupyter",
        "server",
        "--allow-root",
        "--no-browser",
        "--ip",
        "127.0.0.1",
        "--port",
        str(port),
        "--ServerApp.port_retries=0",
        f"--ServerApp.root_dir={root_dir}",
        # Every client runs as one user here: the per-user cap must not turn runs away.
        f"--ForkServer.max_runs_per_user={concurrency}",
    ]
    log_path = os.path.join(folder, "server.log")
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=folder
        )
    server = Server(process, port, token, log_path)
    try:
        wait_until_up(server)
        status, answer = get_json(server, "/pipefork/api/status")
        if status != 200 or not answer["forkserver"]["running"]:
            raise SystemExit(f"the pipefork extension is not serving ({status}):\n{server.log_tail()}")
        server.forkserver_pid = answer["forkserver"]["pid"]
        yield server
    finally:
        stop_server(server)
        shutil.rmtree(folder, ignore_errors=True)


def stop_server(server: Server) -> None:
    """Ask the server to shut down (which stops its fork server), then insist, by pid only."""
    with contextlib.suppress(OSError, http.client.HTTPException):
        conn = server.connect()
        conn.request("POST", "/api/shutdown", headers=server.headers())
        conn.getresponse().read()
        conn.close()
    try:
        server.process.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        server.process.terminate()
        try:
            server.process.wait(5)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()
    if server.forkserver_pid:
        stop_orphan_forkserver(server.forkserver_pid)


def stop_orphan_forkserver(pid: int) -> None:
    """The server's fork server should exit with it; if it outlived it, kill that pid."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"pipefork_kernel.forkserver" not in f.read():
                    return  # gone, and the pid reused by something else
        except OSError:
            return
        time.sleep(0.1)
    progress(f"the server's fork server {pid} outlived the server: killing it")
    with contextlib.suppress(OSError):
        os.kill(pid, signal.SIGKILL)


# --- the REST client --------------------------------------------------------------------


class RestClient:
    """One keep-alive connection to the runs API; counts the TCP connections it needed."""

    def __init__(self, server: Server, user: str):
        self.conn = server.connect()
        self.body = json.dumps({"user": user, "code": CODE}).encode()
        self.headers = {**server.headers(), "Content-Type": "application/json"}
        #: Local ports of the TCP connections used: one if keep-alive held.
        self.ports: set[int] = set()

    def run(self) -> float:
        """POST one run and read its NDJSON to the final line; refuse to time a failure.

        Returns the run's ``duration`` from the final line: seconds the server's own
        ``engine.arun`` took, from before it connects to its fork server to the exit report.
        """
        self.conn.request("POST", "/pipefork/api/runs", body=self.body, headers=self.headers)
        assert self.conn.sock is not None
        self.ports.add(self.conn.sock.getsockname()[1])
        response = self.conn.getresponse()
        payload = response.read()
        if response.status != 200:
            raise SystemExit(f"REST run answered {response.status}: {payload[:500]!r}")
        lines = [json.loads(line) for line in payload.splitlines() if line.strip()]
        final = lines[-1]
        if not final.get("final") or final.get("status") != "ok":
            raise SystemExit(f"REST run failed: {final}")
        if not any(line.get("data", {}).get("text/plain") == "2" for line in lines[:-1]):
            raise SystemExit(f"REST run did not return 2: {lines}")
        self._check_kept_alive(response)
        return final["duration"]

    def whoami(self) -> None:
        """``GET /pipefork/api/whoami`` on the same connection: HTTP, auth and a user look-up, no run."""
        self.conn.request("GET", "/pipefork/api/whoami", headers=self.headers)
        response = self.conn.getresponse()
        payload = response.read()
        # The token holder's identity names no Unix user, so the answer is "allowed": false.
        if response.status != 200 or "identity" not in json.loads(payload):
            raise SystemExit(f"whoami answered {response.status}: {payload[:500]!r}")
        self._check_kept_alive(response)

    @staticmethod
    def _check_kept_alive(response: http.client.HTTPResponse) -> None:
        if response.will_close:
            raise SystemExit("the server closed the keep-alive connection: this would time reconnects")

    def close(self) -> None:
        self.conn.close()


# --- the direct engine ------------------------------------------------------------------


def check_cell(result: RunResult) -> float:
    """:func:`benchlib.check_ok`, and the cell's value must be 2. Returns the run's duration."""
    check_ok(result)
    if not any(out.get("data", {}).get("text/plain") == "2" for out in result.outputs):
        raise SystemExit(f"direct run did not return 2: {result.outputs}")
    return result.duration


# --- the measurements -------------------------------------------------------------------


@dataclass
class Latency:
    """Rows 1, 1b, 2 and 3, and what the goal lines need: paired differences, engine-side durations."""

    rows: dict[str, Row]
    #: Each round's REST minus ``arun_cell_as`` (seconds).
    paired: list[float]
    #: ``duration`` of each run as its engine measured it: the server's (final line) and ours.
    engine_side: dict[str, list[float]]


async def latency_rows(engine: Engine, client: RestClient, user: str, warmup: int, repeat: int) -> Latency:
    """Rows 1, 1b, 2 and 3, interleaved: each round runs one of each kind.

    The order cycles through every permutation, so each kind follows each other
    kind equally often: a process that has been idle for a run wakes up slower,
    and a fixed rotation would hand that to one side.  All in one event loop:
    the HTTP calls block it (nothing else is scheduled), ``arun_cell_as`` awaits
    in it, and ``run_cell_as`` starts its own thread and loop per call as it
    always does.
    """
    engine_side: dict[str, list[float]] = {"rest": [], "arun": []}

    async def rest() -> float:
        return client.run()

    async def whoami() -> None:
        client.whoami()

    async def direct() -> float:
        return check_cell(await engine.arun_cell_as(user, CODE))

    async def direct_sync() -> None:
        check_cell(engine.run_cell_as(user, CODE))

    kinds = {"rest": rest, "whoami": whoami, "arun": direct, "sync": direct_sync}
    times: dict[str, list[float]] = {name: [] for name in kinds}
    orders = list(itertools.permutations(kinds))
    for i in range(warmup + repeat):
        for name in orders[i % len(orders)]:
            start = time.perf_counter()
            inside = await kinds[name]()
            elapsed = time.perf_counter() - start
            if i >= warmup:
                times[name].append(elapsed)
                if inside is not None:
                    engine_side[name].append(inside)
    rows = {
        "rest": Row(
            f"(1) REST `POST /pipefork/api/runs` `{CODE}`, one keep-alive connection", times["rest"], "ms"
        ),
        "whoami": Row(
            "(1b) REST `GET /pipefork/api/whoami`, same connection: HTTP + auth, no run",
            times["whoami"],
            "ms",
        ),
        "arun": Row(f"(2) `await engine.arun_cell_as(user, '{CODE}')`, one event loop", times["arun"], "ms"),
        "sync": Row(f"(3) `engine.run_cell_as(user, '{CODE}')`", times["sync"], "ms"),
    }
    paired = [r - a for r, a in zip(times["rest"], times["arun"], strict=True)]
    return Latency(rows, paired, engine_side)


def rest_throughput(clients: list[RestClient], per_client: int) -> float:
    """runs/s of ``len(clients)`` threads, each running ``per_client`` runs on its connection."""
    gate = threading.Barrier(len(clients) + 1)
    failures: list[BaseException] = []

    def work(client: RestClient) -> None:
        gate.wait()
        try:
            for _ in range(per_client):
                client.run()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
            failures.append(exc)

    threads = [threading.Thread(target=work, args=(client,), daemon=True) for client in clients]
    for thread in threads:
        thread.start()
    gate.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    if failures:
        raise failures[0]
    return len(clients) * per_client / elapsed


async def direct_throughput(engine: Engine, user: str, concurrency: int, per_client: int) -> float:
    """runs/s of ``concurrency`` tasks, each awaiting ``per_client`` runs in turn, in one loop."""

    async def work() -> None:
        for _ in range(per_client):
            check_cell(await engine.arun_cell_as(user, CODE))

    start = time.perf_counter()
    await asyncio.gather(*(work() for _ in range(concurrency)))
    return concurrency * per_client / (time.perf_counter() - start)


def throughput_rows(
    engine: Engine, server: Server, user: str, args: argparse.Namespace
) -> tuple[list[Row], int]:
    """Rows 4-5, alternating rounds; also returns how many TCP connections the clients used."""
    clients = [RestClient(server, user) for _ in range(args.concurrency)]
    try:
        for client in clients:  # connect and warm every connection before timing
            client.run()
        rest_throughput(clients, 1)
        asyncio.run(direct_throughput(engine, user, args.concurrency, 1))
        rest_rates, direct_rates = [], []
        for _ in range(args.rounds):
            rest_rates.append(rest_throughput(clients, args.per_client))
            direct_rates.append(
                asyncio.run(direct_throughput(engine, user, args.concurrency, args.per_client))
            )
        connections = sum(len(client.ports) for client in clients)
    finally:
        for client in clients:
            client.close()
    level = args.concurrency
    return [
        Row(f"(4) REST throughput, {level} clients on {level} keep-alive connections", rest_rates, "runs/s"),
        Row(
            f"(5) throughput, {level} concurrent `arun_cell_as('{CODE}')`, one engine", direct_rates, "runs/s"
        ),
    ], connections


# --- report -----------------------------------------------------------------------------


@dataclass
class Context:
    """What the report says about the set-up, recorded before the server and engine stop."""

    user: str
    server_forkserver: int
    engine_forkserver: int
    latency_requests: int
    latency_connections: int
    throughput_connections: int


def report(latency: Latency, throughput: list[Row], context: Context, args: argparse.Namespace) -> None:
    rows = latency.rows
    rest, whoami, arun, sync = rows["rest"], rows["whoami"], rows["arun"], rows["sync"]
    rest_rate, direct_rate = throughput
    benchlib.print_headline(
        "pipefork REST benchmark",
        context.user,
        args.warmup,
        [f"jupyter_server {jupyter_server.__version__}", f"tornado {tornado.version}"],
    )
    print(
        f"Two fork servers: the Jupyter Server's (pid {context.server_forkserver}) serves rows 1 and 4, "
        f"this script's own Engine's (pid {context.engine_forkserver}) rows 2, 3 and 5. Rows 1-3 "
        f"(and 1b) are interleaved round by round, rows 4 and 5 alternate by round. TCP connections: "
        f"{context.latency_connections} for the {context.latency_requests} requests of rows 1 and 1b, "
        f"{context.throughput_connections} for the {args.concurrency} clients of row 4.\n"
    )
    benchlib.print_table([*rows.values(), *throughput])
    overhead = (rest.median() - arun.median()) * MS
    print(
        f"- REST overhead = (1) - (2) = {overhead:.2f} ms (goal ≤ {GOAL_REST_OVERHEAD_MS:g} ms): "
        f"{benchlib.verdict(overhead <= GOAL_REST_OVERHEAD_MS)}"
    )
    print(
        f"- same, paired by round: median {statistics.median(latency.paired) * MS:.2f} ms, "
        f"p90 {Row('', latency.paired, 'ms').p90() * MS:.2f} ms"
    )
    inside_server = statistics.median(latency.engine_side["rest"]) * MS
    inside_ours = statistics.median(latency.engine_side["arun"]) * MS
    print(
        f"- where it goes: the server's `engine.arun` took {inside_server:.2f} ms (the final line's "
        f"`duration`), this script's {inside_ours:.2f} ms (`RunResult.duration`); the other "
        f"{rest.median() * MS - inside_server:.2f} ms of (1) are HTTP, tornado, auth and the handler, "
        f"client included, next to {whoami.median() * MS:.2f} ms for a request with no run (1b)"
    )
    print(
        f"- for context, no goal: (1) - (3) = {(rest.median() - sync.median()) * MS:.2f} ms "
        f"(the sync call pays a thread and an event loop per run); (1) / (2) = "
        f"{rest.median() / arun.median():.2f}x"
    )
    print(
        f"- throughput, no goal: REST / direct = {rest_rate.median() / direct_rate.median():.2f}x "
        f"at {args.concurrency} in flight (the REST clients are threads of this script: they take "
        "CPU from the server and its fork server on the same cores)"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--user", help=f"existing user to run as (default: a throwaway {THROWAWAY_USER})")
    parser.add_argument(
        "--repeat", type=int, default=200, help="measured rounds of the latency rows (default 200)"
    )
    parser.add_argument("--warmup", type=int, default=10, help="unmeasured rounds first (default 10)")
    parser.add_argument(
        "--concurrency", type=int, default=16, help="clients of the throughput rows (default 16)"
    )
    parser.add_argument(
        "--per-client", type=int, default=8, help="runs per client per throughput round (default 8)"
    )
    parser.add_argument("--rounds", type=int, default=5, help="throughput rounds per side (default 5)")
    args = parser.parse_args(argv)
    if min(args.repeat, args.concurrency, args.per_client, args.rounds) < 1 or args.warmup < 0:
        parser.error("repeat counts and concurrency must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # SIGTERM then stops the server and the fork servers and removes the user, as Ctrl-C does.
    benchlib.start_as_root("it starts a root Jupyter Server (and may create a user)")
    config = Config()
    # As on the server: one user carries every concurrent run, so the per-user cap must allow them.
    config.ForkServer.max_runs_per_user = args.concurrency
    with benchlib.bench_user(args.user, THROWAWAY_USER) as user:
        with contextlib.ExitStack() as stack:
            progress("starting a Jupyter Server with the pipefork extension")
            server = stack.enter_context(jupyter_server_running(args.concurrency))
            progress(f"server up on port {server.port}; starting this script's own engine")
            engine = make_engine(stack, config)
            client = RestClient(server, user)
            stack.callback(client.close)
            progress("latency: REST run, REST whoami, arun_cell_as and run_cell_as, interleaved")
            latency = asyncio.run(latency_rows(engine, client, user, args.warmup, args.repeat))
            progress(f"throughput: {args.concurrency} REST clients, {args.concurrency} direct runs")
            throughput, connections = throughput_rows(engine, server, user, args)
            context = Context(
                user,
                server.forkserver_pid,
                engine.forkserver.pid,
                2 * (args.warmup + args.repeat),
                len(client.ports),
                connections,
            )
            progress("stopping the server and the engine")
        progress("removing the user" if args.user is None else "done")
    report(latency, throughput, context, args)


if __name__ == "__main__":
    main()
