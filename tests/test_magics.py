"""%%run_as in a real root ipykernel, driven through jupyter_client."""

from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from jupyter_client.manager import KernelManager


@dataclass
class Execution:
    reply: dict
    messages: list[tuple[float, dict]] = field(default_factory=list)

    def of_type(self, msg_type: str) -> list[dict]:
        return [m["content"] for _, m in self.messages if m["msg_type"] == msg_type]

    @property
    def stdout(self) -> str:
        return "".join(c["text"] for c in self.of_type("stream") if c["name"] == "stdout")

    @property
    def error(self) -> dict:
        errors = self.of_type("error")
        assert errors, f"expected an error, got {self.reply}"
        return errors[0]


def strip_ansi(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


@pytest.fixture(scope="module")
def kernel(users) -> Iterator:
    """A stock ipykernel running as root, with pipefork's magics loaded."""
    manager = KernelManager(kernel_name="python3")
    manager.start_kernel(cwd="/")
    client = manager.client()
    client.start_channels()
    client.wait_for_ready(timeout=60)
    run(client, "%load_ext pipefork_kernel")
    yield manager, client
    client.stop_channels()
    manager.shutdown_kernel(now=True)


def run(client, code: str, timeout: float = 60, interrupt_after: float | None = None, manager=None):
    """Execute ``code`` and collect its iopub messages until the kernel is idle."""
    msg_id = client.execute(code)
    execution = Execution(reply={})
    deadline = time.monotonic() + timeout
    interrupted = False
    while True:
        started = execution.messages[0][0] if execution.messages else None
        due = started is not None and interrupt_after is not None and not interrupted
        if due and time.monotonic() - started > interrupt_after:
            manager.interrupt_kernel()
            interrupted = True
        try:
            message = client.get_iopub_msg(timeout=0.2)
        except queue.Empty:
            assert time.monotonic() < deadline, f"no idle after {timeout}s running {code!r}"
            continue
        if message["parent_header"].get("msg_id") != msg_id:
            continue
        execution.messages.append((time.monotonic(), message))
        if message["msg_type"] == "status" and message["content"]["execution_state"] == "idle":
            break
    execution.reply = client.get_shell_msg(timeout=timeout)["content"]
    return execution


def test_cell_runs_as_the_user(kernel, users):
    _, client = kernel
    result = run(
        client, f"%%run_as {users.student1}\nimport getpass, os\nprint(getpass.getuser(), os.getuid())"
    )
    assert result.reply["status"] == "ok"
    assert result.stdout.split()[0] == users.student1
    assert result.stdout.split()[1] != "0"


def test_line_form_and_last_expression(kernel, users):
    _, client = kernel
    result = run(client, f"%run_as --timeout 20 {users.student2} __import__('getpass').getuser()")
    assert result.reply["status"] == "ok"
    assert result.of_type("execute_result")[0]["data"]["text/plain"] == repr(users.student2)


def test_output_streams_while_the_cell_runs(kernel, users):
    _, client = kernel
    code = f"%%run_as {users.student1}\nimport time\nfor i in range(3):\n    print('line', i)\n"
    code += "    time.sleep(0.5)"
    result = run(client, code)
    streams = [(t, m) for t, m in result.messages if m["msg_type"] == "stream"]
    idle_at = result.messages[-1][0]
    assert "".join(m["content"]["text"] for _, m in streams) == "line 0\nline 1\nline 2\n"
    assert idle_at - streams[0][0] > 0.8, "output only arrived at the end"


def test_matplotlib_figure_is_displayed(kernel, users):
    _, client = kernel
    code = f"%%run_as {users.student1}\nimport matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.show()"
    result = run(client, code, timeout=120)
    assert result.reply["status"] == "ok", result.of_type("error")
    assert any("image/png" in d["data"] for d in result.of_type("display_data"))


def test_traceback_names_the_user(kernel, users):
    _, client = kernel
    result = run(client, f"%%run_as {users.student1}\ndef f():\n    return 1 / 0\nf()")
    assert result.reply["status"] == "error"
    trace = strip_ansi("\n".join(result.error["traceback"]))
    assert "ZeroDivisionError" in trace and "return 1 / 0" in trace
    assert users.student1 in trace
    assert "magics.py" not in trace, "pipefork's own frames should not be shown"


def test_push_and_pull(kernel, users):
    _, client = kernel
    run(client, "data = [3, 4, 5]")
    code = f"%%run_as {users.student1} --push data --pull score,who\n"
    code += "import getpass\nscore = sum(data)\nwho = getpass.getuser()"
    result = run(client, code)
    assert result.reply["status"] == "ok", result.of_type("error")
    check = run(client, "score, who")
    assert check.of_type("execute_result")[0]["data"]["text/plain"] == f"(12, {users.student1!r})"


def test_non_json_pull_is_refused(kernel, users):
    _, client = kernel
    result = run(client, f"%%run_as {users.student1} --pull things\nthings = {{1, 2}}")
    assert result.reply["status"] == "error"
    assert "things (builtins.set)" in result.error["evalue"]
    assert "JSON" in result.error["evalue"]


def test_timeout(kernel, users):
    _, client = kernel
    result = run(client, f"%%run_as {users.student1} --timeout 1\nwhile True:\n    pass")
    assert result.reply["status"] == "error"
    assert "RunTimeout" in result.error["evalue"] or "timeout" in result.error["evalue"]


def test_interrupt_ends_the_run(kernel, users):
    manager, client = kernel
    code = f"%%run_as {users.student1}\nprint('sleeping', flush=True)\nimport time\ntime.sleep(60)"
    start = time.monotonic()
    result = run(client, code, interrupt_after=0.5, manager=manager)
    assert time.monotonic() - start < 15
    assert result.reply["status"] == "error"
    assert result.error["ename"] == "KeyboardInterrupt"
    time.sleep(0.5)
    left = subprocess.run(["pgrep", "-u", users.student1], capture_output=True, text=True).stdout
    assert left == "", f"processes of {users.student1} survived the interrupt: {left}"


def test_html_is_sanitized_unless_trusted(kernel, users):
    _, client = kernel
    code = textwrap.dedent(
        """
        from IPython.display import HTML, Javascript, display
        display(HTML("<b onclick='steal()'>bold</b><script>steal()</script><iframe src='x'></iframe>"))
        display(Javascript("steal()"))
        """
    )
    untrusted = run(client, f"%%run_as {users.student1}" + code)
    html = untrusted.of_type("display_data")[0]["data"]["text/html"]
    assert "<b>bold</b>" in html
    assert "script" not in html and "onclick" not in html and "iframe" not in html
    assert all("application/javascript" not in d["data"] for d in untrusted.of_type("display_data"))

    trusted = run(client, f"%%run_as {users.student1} --trust-output" + code)
    bundles = [d["data"] for d in trusted.of_type("display_data")]
    assert "<script>steal()</script>" in bundles[0]["text/html"]
    assert bundles[1]["application/javascript"] == "steal()"


def test_decorator(kernel, users):
    _, client = kernel
    code = textwrap.dedent(
        f"""
        from pipefork_kernel import run_as

        @run_as({users.student2!r})
        def uid_plus(n):
            import os
            print("inside", os.getuid())
            return os.getuid() + n

        uid_plus(1)
        """
    )
    result = run(client, code)
    assert result.reply["status"] == "ok", result.of_type("error")
    uid = int(result.stdout.split()[1])
    assert uid != 0
    assert result.of_type("execute_result")[0]["data"]["text/plain"] == str(uid + 1)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("%%run_as", "UsageError"),
        ("%%run_as {user} --bogus", "UsageError"),
        ("%%run_as pftest_no_such_user", "no such user"),
        ("%%run_as root", "uid 0"),
        ("%%run_as {user} --pull nothere", "not defined after the cell ran: nothere"),
        ("%%run_as {user} --push nothere", "cannot push nothere"),
    ],
)
def test_bad_usage_gets_one_clear_line(kernel, users, line, expected):
    _, client = kernel
    result = run(client, line.format(user=users.student1) + "\nx = 1")
    assert result.reply["status"] == "error"
    # IPython prints a UsageError as one stderr line; other errors come as an error message.
    shown = "".join(c["text"] for c in result.of_type("stream") if c["name"] == "stderr")
    shown += "\n".join(strip_ansi(line) for e in result.of_type("error") for line in e["traceback"])
    assert expected in shown, shown
    assert len(shown.strip().splitlines()) <= 2, shown


def test_non_root_kernel_explains(users, shared_dir):
    script = os.path.join(shared_dir, "nonroot.py")
    with open(script, "w") as f:
        f.write(
            textwrap.dedent(
                f"""
                from IPython.core.interactiveshell import InteractiveShell
                shell = InteractiveShell.instance()
                shell.run_cell("%load_ext pipefork_kernel")
                shell.run_cell("%%run_as {users.student2}\\nprint(1)")
                shell.run_cell("%%run_as {users.student1}\\nimport getpass; print('self', getpass.getuser())")
                """
            )
        )
    out = subprocess.run(
        ["runuser", "-u", users.student1, "--", sys.executable, script],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=shared_dir,
    )
    text = strip_ansi(out.stdout + out.stderr)
    assert f"PolicyError: running as {users.student2!r} needs root" in text
    assert f"self {users.student1}" in text
