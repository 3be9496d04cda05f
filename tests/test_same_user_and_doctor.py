"""Without root: runs as yourself work, others are refused. And the doctor command."""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
import textwrap

import pytest

from pipefork_kernel import PipeforkError


def run_as_user(user: str, script: str, cwd: str) -> subprocess.CompletedProcess:
    """Run a Python script as ``user`` in a fresh process, as that user would."""
    path = os.path.join(cwd, "script.py")
    with open(path, "w") as f:
        f.write(textwrap.dedent(script))
    os.chmod(path, 0o644)
    return subprocess.run(
        ["runuser", "-u", user, "--", sys.executable, path],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )


def test_non_root_caller_runs_as_itself_only(users, shared_dir):
    out = run_as_user(
        users.student1,
        f"""
        import os
        from pipefork_kernel import PolicyError, ChildCrashed, run_as, run_cell_as

        result = run_cell_as({users.student1!r}, "import os\\nos.getuid()")
        print("cell", result.status, result.outputs[-1]["data"]["text/plain"])
        print("timeout", run_cell_as({users.student1!r}, "while True: pass", timeout=0.5).status)
        try:
            run_as({users.student1!r}, os._exit, args=(5,))
        except ChildCrashed as exc:
            print("crash isolated:", "status 5" in str(exc))
        try:
            run_cell_as({users.student2!r}, "1")
        except PolicyError as exc:
            print("refused:", exc)
        """,
        shared_dir,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    uid = pwd.getpwnam(users.student1).pw_uid
    assert lines[0] == f"cell ok {uid}"
    assert lines[1] == "timeout timeout"
    assert lines[2] == "crash isolated: True"
    assert lines[3].startswith(f"refused: running as {users.student2!r} needs root")


def test_unreadable_module_explains_the_fix(engine, users, shared_dir):
    """An import the user cannot read fails with the reason and the fix, not a bare error."""
    private = os.path.join(shared_dir, "private")
    os.makedirs(private)
    os.chmod(private, 0o700)
    with open(os.path.join(private, "pf_private_helpers.py"), "w") as f:
        f.write("def answer():\n    return 42\n")
    sys.path.append(private)
    try:
        import pf_private_helpers

        def uses_private():
            return pf_private_helpers.answer()

        with pytest.raises(PipeforkError) as info:
            engine.run_as(users.student1, uses_private)
    finally:
        sys.path.remove(private)
        sys.modules.pop("pf_private_helpers", None)
    message = str(info.value)
    assert "pf_private_helpers" in message
    assert f"not readable by that user: {private}" in message
    assert "world-readable environment" in message


def doctor(user: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipefork_kernel", "doctor", "--user", user],
        capture_output=True,
        text=True,
        timeout=120,
        cwd="/",
    )


def test_doctor_passes_for_a_good_user(users):
    out = doctor(users.student1)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "FAIL" not in out.stdout
    assert "Python installation readable by the user" in out.stdout


def test_doctor_explains_a_refused_user(users):
    out = doctor("root")
    assert out.returncode == 1
    assert "FAIL" in out.stdout and "uid 0" in out.stdout
