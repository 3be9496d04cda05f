"""The soak harness's short form, and a regression test for each problem it found.

``benchmarks/soak.py`` is the operators' tool (minutes, tens of thousands of
runs); here its core runs a few hundred runs against a real root server and
an engine and must pass the same checks.  Problems the soak found in the
product were fixed; each has a regression test below (the letters match the
soak's report).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import importlib.util
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
import types
import urllib.error
import urllib.request
from pathlib import Path

import pytest

#: The same prefix the conftest fixtures use, so suites running side by side do not collide.
USER_PREFIX = os.environ.get("PIPEFORK_TEST_USER_PREFIX", "pftest_")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the soak creates users and a root server")
SOAK_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "soak.py"


def _load_soak():
    spec = importlib.util.spec_from_file_location("soak", SOAK_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["soak"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


soak = _load_soak()

#: Every kind of garbage frame, "truncated" included (it used to trip bug E).
SHORT_SKIP_GARBAGE: tuple[str, ...] = ()


@needs_root
@pytest.mark.timeout(240)
def test_short_soak():
    """600 runs, 12 at a time, of every kind, the fork server killed once: all checks hold."""
    config = soak.SoakConfig(
        runs=600,
        concurrency=12,
        user_prefix=f"{USER_PREFIX}soak_",
        recreate_users=True,
        skip_garbage=SHORT_SKIP_GARBAGE,
        verbose=False,
    )
    started = time.monotonic()
    report = soak.run(config)
    elapsed = time.monotonic() - started
    table = report.table()
    print(table, f"\n(short soak: {elapsed:.0f} s)")
    details = "\n".join(f"{key}: {text}" for key, text in report.problems)
    assert not report.failed, f"{table}\n\nfailed: {[r.check for r in report.failed]}\n{details}"
    assert elapsed < 120, f"the short soak took {elapsed:.0f} s; keep it well inside CI's time"


# --- regression tests, one per problem the soak found -------------------------------------------


def test_display_update_reaches_the_outputs(engine, users):
    seen = []
    code = "from IPython.display import display\nh = display('old', display_id=True)\nh.update('new')"
    result = engine.run_cell_as(users.student1, code, on_output=seen.append)
    assert result.status == "ok"
    assert [o["data"]["text/plain"] for o in result.outputs] == ["'new'"]
    update = next(o for o in seen if o["output_type"] == "update_display_data")
    assert update.get("transient", {}).get("display_id")


def test_last_words_before_a_crash_arrive(engine, users):
    code = "import os, time\ntime.sleep(0.2)\nprint('last words')\nos._exit(3)"
    for _ in range(5):
        result = engine.run_cell_as(users.student1, code)
        assert result.status == "crashed" and result.exit_code == 3
        assert "".join(o.get("text", "") for o in result.outputs) == "last words\n"


def _sleepers(user: str, seconds: int) -> list[int]:
    found = subprocess.run(["pgrep", "-u", user, "-f", f"^sleep {seconds}$"], capture_output=True, text=True)
    return [int(pid) for pid in found.stdout.split()]


def test_killed_fork_server_takes_its_runs_subprocesses(make_engine, users):
    engine = make_engine()
    code = (
        "import subprocess, time\nps = [subprocess.Popen(['sleep', '613']) for _ in range(3)]\n"
        "print('up', flush=True)\ntime.sleep(60)"
    )

    async def scenario():
        up = asyncio.Event()
        run = asyncio.ensure_future(
            engine.arun_cell_as(users.student2, code, timeout=90, on_output=lambda _: up.set())
        )
        await asyncio.wait_for(up.wait(), 60)
        os.kill(engine.forkserver.pid, signal.SIGKILL)
        return await run

    try:
        result = asyncio.run(scenario())
        assert result.status == "crashed"
        deadline = time.monotonic() + 5
        while _sleepers(users.student2, 613) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _sleepers(users.student2, 613) == []
    finally:
        for pid in _sleepers(users.student2, 613):
            os.kill(pid, signal.SIGKILL)


def test_protocol_error_after_exit_is_a_result_not_broken_pipe(make_engine, users):
    """Bug D (fixed in 6772698): the cancel sent after a ProtocolError met a closed connection.

    BrokenPipeError escaped to engine callers, and a 500 cut the REST stream short.
    """
    engine = make_engine()
    # The child writes half a frame and exits; the caller's loop is busy meanwhile (a slow
    # on_output), so the exit report and EOF are both waiting when the garbage is noticed.
    code = "import os\nprint('x', flush=True)\nos.write(3, b'\\x00\\x00\\x01\\x00{')\nos._exit(0)"

    async def scenario():
        for _ in range(3):
            # on_output of the async API runs on the event loop: sleeping there blocks it.
            result = await engine.arun_cell_as(users.student1, code, on_output=lambda _: time.sleep(0.5))
            assert result.status == "error" and result.error["ename"] == "ProtocolError"

    asyncio.run(scenario())


@needs_root
def test_fork_server_survives_a_hangup_in_the_same_batch_as_the_exit():
    from pipefork_kernel.forkserver import ForkServerLoop, Run

    loop = ForkServerLoop({"min_uid": 1000, "max_uid": 60000, "allow_root": False, "max_runs_per_user": 4})
    client, conn = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    # A harmless process group for _finish to SIGKILL.
    child = subprocess.Popen(["sleep", "30"], start_new_session=True)
    run = Run(
        pid=child.pid,
        kind="run",
        conn=conn,
        user="nobody",
        uid=65534,
        started=time.monotonic(),
        deadline=None,
        kill_grace=1.0,
    )
    conn.setblocking(False)
    loop.selector.register(conn, selectors.EVENT_READ, run)
    client.close()  # the client hung up ...
    try:
        loop._finish(run, 0)  # ... in the batch where the child's exit is handled first
        loop._client_message(run)
    finally:
        child.kill()
        child.wait()


@needs_root
def test_status_answers_while_the_fork_server_dies():
    config = soak.SoakConfig(runs=1, users=1, user_prefix=f"{USER_PREFIX}soakf_", recreate_users=True)
    with soak.world(config) as world, soak.server(config, world) as server:
        request = urllib.request.Request(
            server.base_url + "pipefork/api/status",
            headers={"Authorization": f"token {server.tokens[soak.ADMIN]}"},
        )

        def get() -> int:
            try:
                with urllib.request.urlopen(request, timeout=30) as response:
                    return response.status
            except urllib.error.HTTPError as exc:
                return exc.code

        assert get() == 200
        forkserver = soak.forkserver_of(server.pid)
        os.kill(forkserver, signal.SIGSTOP)  # it accepts nothing, answers nothing ...
        codes: list[int] = []
        waiter = threading.Thread(target=lambda: codes.append(get()))
        waiter.start()
        time.sleep(0.5)
        os.kill(forkserver, signal.SIGKILL)  # ... and dies while a status request waits
        waiter.join(30)
        assert codes == [200]


def test_a_cancelled_run_leaves_no_stale_watch_on_its_fd(make_engine, users):
    engine = make_engine()
    code = "import time\nprint('up', flush=True)\ntime.sleep(30)"

    async def scenario() -> list[bool]:
        loop = asyncio.get_running_loop()
        up = asyncio.Event()
        run = asyncio.ensure_future(engine.arun_cell_as(users.student1, code, on_output=lambda _: up.set()))
        await up.wait()
        pairs: list[tuple[socket.socket, socket.socket, asyncio.Event]] = []

        def open_sockets() -> None:
            # Queued behind the cancelled run's step: runs right after it closed its sockets.
            for _ in range(3):
                a, b = socket.socketpair()
                heard = asyncio.Event()
                loop.add_reader(a.fileno(), heard.set)
                pairs.append((a, b, heard))

        run.cancel()
        loop.call_soon(open_sockets)
        with contextlib.suppress(asyncio.CancelledError):
            await run
        for _, b, _ in pairs:
            b.send(b"x")
        await asyncio.sleep(1.0)
        for a, b, _ in pairs:
            loop.remove_reader(a.fileno())
            a.close()
            b.close()
        return [heard.is_set() for _, _, heard in pairs]

    assert asyncio.run(scenario()) == [True, True, True], (
        "a socket reusing the run's fd number was never woken"
    )


def test_a_fork_server_dying_before_the_request_is_a_fork_server_error(make_engine, users):
    from pipefork_kernel import ForkServerError

    engine = make_engine()
    assert engine.run_cell_as(users.student1, "1").status == "ok"
    connect = engine.forkserver.connect

    def connect_then_die() -> socket.socket:
        sock = connect()
        os.kill(engine.forkserver.pid, signal.SIGKILL)
        engine.forkserver.process.wait()
        return sock

    engine.forkserver.connect = connect_then_die
    with pytest.raises(ForkServerError):
        engine.run_cell_as(users.student1, "1")
    engine.forkserver.connect = connect
    assert engine.run_cell_as(users.student1, "print(1)").status == "ok", "the next run restarts it"


def test_status_survives_runs_changing_under_it():
    from jupyter_server_ext.app import PipeforkApp, RunRecord

    forkserver = types.SimpleNamespace(running=lambda: False, pid=None, restarts=0, max_runs_per_user=16)
    policy = types.SimpleNamespace(min_uid=1000, allow_root=False, allowed_users=[], denied_users=[])
    app = types.SimpleNamespace(
        engine=types.SimpleNamespace(forkserver=forkserver, policy=policy),
        active={},
        done_by_status=collections.Counter(),
        run_policy=types.SimpleNamespace(describe=dict),
        default_timeout=60.0,
        max_timeout=3600.0,
        max_request_bytes=1,
    )
    stop = threading.Event()

    def event_loop_side() -> None:
        """What the handlers do on the loop thread: runs start and end all the time."""
        serial = 0
        while not stop.is_set():
            app.active[serial] = RunRecord("someone", "user", "code")
            app.active.pop(serial - 8, None)
            app.done_by_status["ok"] += 1
            serial += 1

    churn = threading.Thread(target=event_loop_side)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often, as a busy server does
    churn.start()
    try:
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            PipeforkApp.status(app)
    finally:
        stop.set()
        churn.join()
        sys.setswitchinterval(interval)
