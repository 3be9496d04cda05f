"""What a caller of run_as / run_cell_as sees: outputs, results, errors, limits."""

from __future__ import annotations

import asyncio
import base64
import os
import pwd
import re
import subprocess
import sys
import textwrap
import time

import pytest

from pipefork_kernel import (
    ChildCrashed,
    PolicyError,
    RemoteError,
    ResultNotJSON,
    RunTimeout,
)


def strip_ansi(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def texts(result, name="stdout") -> str:
    return "".join(o["text"] for o in result.outputs if o["output_type"] == "stream" and o["name"] == name)


def test_run_as_returns_value_and_relays_prints(engine, users, capfd):
    def whoami(n):
        import getpass
        import os

        print("hello from", getpass.getuser())
        return {"uid": os.getuid(), "n": n}

    value = engine.run_as(users.student1, whoami, args=(3,))
    assert value == {"uid": pwd.getpwnam(users.student1).pw_uid, "n": 3}
    assert f"hello from {users.student1}" in capfd.readouterr().out


def test_run_cell_as_gives_notebook_outputs(engine, users):
    result = engine.run_cell_as(users.student1, "import os\nprint('side')\nos.getuid()")
    assert result.status == "ok"
    assert result.user == users.student1
    assert result.uid == pwd.getpwnam(users.student1).pw_uid
    assert result.outputs == [
        {"output_type": "stream", "name": "stdout", "text": "side\n"},
        {
            "output_type": "execute_result",
            "execution_count": 1,
            "data": {"text/plain": str(result.uid)},
            "metadata": {},
        },
    ]
    assert result.exit_code == 0 and result.signal is None and result.duration > 0


def test_cell_magics_and_home(engine, users):
    result = engine.run_cell_as(users.student2, "%cd ~\nimport os\nprint(os.getcwd(), os.environ['HOME'])")
    home = pwd.getpwnam(users.student2).pw_dir
    assert result.status == "ok", result.error
    assert f"{home} {home}" in texts(result)


def test_rich_display_in_order(engine, users):
    code = textwrap.dedent(
        """
        from IPython.display import display
        class Rich:
            def _repr_html_(self):
                return "<b>rich</b>"
            def _repr_png_(self):
                return b"\\x89PNG\\r\\n\\x1a\\nfake"
        print("before")
        display(Rich())
        display({"a": 1}, raw=False)
        display(Rich())
        print("after")
        Rich()
        """
    )
    result = engine.run_cell_as(users.student1, code)
    assert result.status == "ok", result.error
    kinds = [o["output_type"] for o in result.outputs]
    assert kinds == ["stream", "display_data", "display_data", "display_data", "stream", "execute_result"]
    first = result.outputs[1]["data"]
    assert first["text/html"] == "<b>rich</b>"
    assert base64.b64decode(first["image/png"]) == b"\x89PNG\r\n\x1a\nfake"
    assert result.outputs[-1]["data"]["text/html"] == "<b>rich</b>"


def test_update_and_clear_display(engine, users):
    code = textwrap.dedent(
        """
        from IPython.display import display, clear_output
        handle = display("old", display_id=True)
        handle.update("new")
        print("gone soon")
        clear_output()
        print("kept")
        """
    )
    seen = []
    result = engine.run_cell_as(users.student1, code, on_output=seen.append)
    assert [o["output_type"] for o in seen] == [
        "display_data",
        "update_display_data",
        "stream",
        "clear_output",
        "stream",
    ]
    assert result.outputs == [{"output_type": "stream", "name": "stdout", "text": "kept\n"}]


def test_outputs_stream_live(engine, users):
    """Each line arrives while the run is still going, not at the end."""
    arrivals: list[tuple[float, str]] = []

    def record(output):
        if output["output_type"] == "stream":
            arrivals.append((time.monotonic(), output["text"]))

    start = time.monotonic()
    code = "import time\nfor i in range(3):\n    print('tick', i)\n    time.sleep(0.5)"
    result = engine.run_cell_as(users.student1, code, on_output=record)
    end = start + result.duration
    assert result.status == "ok"
    assert "".join(t for _, t in arrivals) == "tick 0\ntick 1\ntick 2\n"
    first_arrival = arrivals[0][0]
    assert end - first_arrival > 0.8, "the first line only arrived when the run ended"


def test_subprocess_output_is_captured(engine, users):
    code = "import subprocess\nsubprocess.run(['id', '-un'])\n!echo bang"
    result = engine.run_cell_as(users.student1, code)
    assert result.status == "ok", result.error
    out = texts(result)
    assert users.student1 in out and "bang" in out


def test_cell_traceback_names_user(engine, users):
    result = engine.run_cell_as(users.student1, "def f():\n    return 1/0\nf()")
    assert result.status == "error"
    assert result.error["ename"] == "ZeroDivisionError"
    assert any("return 1/0" in strip_ansi(line) for line in result.error["traceback"])
    assert users.student1 in result.error["traceback"][-1]
    assert result.outputs[-1]["output_type"] == "error"


def test_function_exception_becomes_remote_error(engine, users):
    def fails():
        raise ValueError("bad input 42")

    with pytest.raises(RemoteError) as info:
        engine.run_as(users.student1, fails)
    assert info.value.ename == "ValueError"
    assert info.value.evalue == "bad input 42"
    assert any("fails" in line for line in info.value.traceback)
    assert users.student1 in str(info.value)


def test_non_json_return_is_refused_clearly(engine, users):
    def returns_set():
        return {1, 2}

    with pytest.raises(ResultNotJSON, match=r"builtins\.set.*JSON"):
        engine.run_as(users.student1, returns_set)


def test_output_cap_drops_with_notice(make_engine, users):
    eng = make_engine(RunLimits__max_output_bytes=10_000)
    result = eng.run_cell_as(users.student1, "for i in range(100_000):\n    print('x' * 50)\n'end'")
    assert result.status == "ok"
    assert len(texts(result)) <= 12_000
    assert "output limit" in result.outputs[-1]["text"]


def test_timeout_kills_loop_that_ignores_sigterm(engine, users):
    code = "import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('spinning')\nwhile True: pass"
    start = time.monotonic()
    result = engine.run_cell_as(users.student1, code, timeout=1.0)
    assert result.status == "timeout"
    assert result.signal == 9
    assert "spinning" in texts(result)
    assert time.monotonic() - start < 10

    def sleeper():
        import time

        time.sleep(60)

    with pytest.raises(RunTimeout, match=r"did not finish within 0\.5 s"):
        engine.run_as(users.student1, sleeper, timeout=0.5)


def test_segfault_is_reported_as_crash(engine, users):
    result = engine.run_cell_as(users.student1, "print('last words')\nimport os\nos.kill(os.getpid(), 11)")
    assert result.status == "crashed"
    assert result.signal == 11
    assert "SIGSEGV" in result.error["evalue"]
    assert "last words" in texts(result)

    def exits():
        import os

        os._exit(3)

    with pytest.raises(ChildCrashed, match="exited with status 3"):
        engine.run_as(users.student1, exits)


def test_sys_exit_and_keyboard_interrupt_are_errors(engine, users):
    result = engine.run_cell_as(users.student1, "raise KeyboardInterrupt")
    assert result.status == "error" and result.error["ename"] == "KeyboardInterrupt"

    def leaves():
        import sys

        sys.exit(4)

    with pytest.raises(RemoteError) as info:
        engine.run_as(users.student1, leaves)
    assert info.value.ename == "SystemExit" and info.value.evalue == "4"


def test_cwd_and_env(engine, users, shared_dir):
    def where():
        import os

        return [os.getcwd(), os.environ.get("COURSE")]

    assert engine.run_as(users.student1, where, cwd=shared_dir, env={"COURSE": "cs101"}) == [
        shared_dir,
        "cs101",
    ]
    result = engine.run_cell_as(users.student1, "1", cwd="/root")
    assert result.status == "error"
    assert result.error["ename"] == "WorkingDirectoryError"


def test_fifty_concurrent_runs_keep_their_outputs(engine, users):
    async def many():
        jobs = []
        for i in range(50):
            user = users.student1 if i % 2 else users.student2
            code = f"import getpass, time\ntime.sleep(0.05)\nprint('run-{i}', getpass.getuser())"
            jobs.append(engine.arun_cell_as(user, code))
        return await asyncio.gather(*jobs)

    results = asyncio.run(many())
    for i, result in enumerate(results):
        user = users.student1 if i % 2 else users.student2
        assert result.status == "ok", result.error
        assert texts(result) == f"run-{i} {user}\n"
        assert result.user == user


def test_script_functions_use_their_module(users, shared_dir):
    """A function from a script may use helpers, constants and imports of its module."""
    script = os.path.join(shared_dir, "grade.py")
    with open(script, "w") as f:
        f.write(
            textwrap.dedent(
                f"""
                import json
                import statistics
                from pipefork_kernel import run_as

                WEIGHT = 2

                def helper(values):
                    return statistics.mean(values) * WEIGHT

                def grade(values):
                    import getpass
                    return {{"user": getpass.getuser(), "score": helper(values)}}

                print(json.dumps(run_as({users.student2!r}, grade, args=([1, 2, 3],))))
                """
            )
        )
    out = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == f'{{"user": "{users.student2}", "score": 4}}'


def test_policy_refusals_say_why(engine, users, make_engine):
    with pytest.raises(PolicyError, match="uid 0"):
        engine.run_as("root", print)
    with pytest.raises(PolicyError, match="no such user"):
        engine.run_as("pftest_nobody_here", print)
    denied = make_engine(UserPolicy__denied_users=[users.student1])
    with pytest.raises(PolicyError, match="denied_users"):
        denied.run_cell_as(users.student1, "1")
    assert denied.run_cell_as(users.student2, "1").status == "ok"


def test_fork_server_restarts_after_being_killed(engine, users):
    old_pid = engine.forkserver.pid
    assert engine.run_cell_as(users.student1, "1").status == "ok"
    os.kill(engine.forkserver.pid, 9)
    engine.forkserver.process.wait()
    result = engine.run_cell_as(users.student1, "print('back')")
    assert result.status == "ok" and texts(result) == "back\n"
    assert engine.forkserver.pid != old_pid


def test_no_zombies_or_leaked_fds_after_many_runs(engine, users):
    engine.run_cell_as(users.student1, "1")
    before = engine.forkserver.status()

    async def batch():
        return await asyncio.gather(
            *(engine.arun_cell_as(users.student1, "print(1)") for _ in range(40)),
            engine.arun_cell_as(users.student1, "import os; os.kill(os.getpid(), 9)"),
            engine.arun_cell_as(users.student1, "while True: pass", timeout=0.3),
        )

    asyncio.run(batch())
    time.sleep(0.5)
    after = engine.forkserver.status()
    assert after["open_fds"] == before["open_fds"]
    assert after["children"] == 0 and after["active"] == []
    assert after["threads"] == 1
    zombies = _zombie_children(after["pid"])
    assert zombies == []
    assert _count_fds(os.getpid()) < 200


def _zombie_children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] == "Z" and int(fields[1]) == pid:
                found.append(int(entry))
    return found


def _count_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_module_functions_use_the_shared_engine(users):
    import pipefork_kernel

    async def push_and_pull():
        return await pipefork_kernel.arun_cell_as(users.student1, "y = x * 2", push={"x": 21}, pull=["y"])

    result = asyncio.run(push_and_pull())
    assert result.status == "ok" and result.result["values"] == {"y": 42}

    @pipefork_kernel.run_as(users.student2, on_output=None)
    def whoami():
        import getpass

        return getpass.getuser()

    assert whoami() == users.student2


def test_a_failing_output_callback_stops_the_run_and_is_raised(engine, users):
    """The caller's own on_output error is the caller's, not a protocol error, and ends the run."""

    def explode(output):
        raise RuntimeError("display is broken")

    with pytest.raises(RuntimeError, match="display is broken"):
        engine.run_cell_as(users.student1, "print('x')\nimport time; time.sleep(30)", on_output=explode)
    deadline = time.monotonic() + 5
    while engine.forkserver.status()["active"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.forkserver.status()["active"] == [], "the run went on without its caller"
