"""Owner kernels through jupyter_client: each notebook's kernel runs as its owner."""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator

import pytest
from jupyter_client.manager import KernelManager

from pipefork_kernel import PipeforkError, get_engine

TOKEN = "pftest-server-token-3f9a1c"


def notebook_for(user: str, root: str) -> str:
    """A notebook owned by ``user`` in a directory it owns, reachable by it."""
    entry = pwd.getpwnam(user)
    folder = os.path.join(root, user)
    os.makedirs(folder, exist_ok=True)
    os.chown(folder, entry.pw_uid, entry.pw_gid)
    path = os.path.join(folder, "work.ipynb")
    with open(path, "w") as f:
        f.write("{}")
    os.chown(path, entry.pw_uid, entry.pw_gid)
    return path


def launch(path: str) -> KernelManager:
    """Start a pipefork kernel the way Jupyter Server does for a notebook."""
    manager = KernelManager(kernel_name="pipefork")
    env = {**os.environ, "JPY_SESSION_NAME": path, "JUPYTER_TOKEN": TOKEN}
    manager.start_kernel(cwd=os.path.dirname(path), env=env)
    return manager


class Kernel:
    def __init__(self, path: str):
        self.manager = launch(path)
        self.client = self.manager.client()
        self.client.start_channels()
        self.client.wait_for_ready(timeout=60)

    def run(self, code: str, timeout: float = 60, **kwargs) -> tuple[dict, list[dict]]:
        """Execute and return the reply and the iopub messages of this execution."""
        outputs: list[dict] = []
        reply = self.client.execute_interactive(code, timeout=timeout, output_hook=outputs.append, **kwargs)
        return reply["content"], outputs

    def stdout(self, code: str) -> str:
        reply, outputs = self.run(code)
        assert reply["status"] == "ok", reply
        return "".join(m["content"]["text"] for m in outputs if m["msg_type"] == "stream")

    def close(self) -> None:
        self.client.stop_channels()
        if self.manager.has_kernel:
            self.manager.shutdown_kernel(now=True)


@pytest.fixture
def tree(users, shared_dir) -> dict[str, str]:
    return {user: notebook_for(user, shared_dir) for user in (users.student1, users.grouped)}


@pytest.fixture
def kernel(tree, users) -> Iterator[Kernel]:
    k = Kernel(tree[users.student1])
    yield k
    k.close()


def test_two_owners_each_get_their_identity(tree, users):
    kernels = {user: Kernel(path) for user, path in tree.items()}
    try:
        probe = "import os\nprint(os.getuid(), os.getgid(), sorted(os.getgroups()), end=' ')\n"
        probe += "print(os.environ['HOME'], os.getcwd())"
        for user, k in kernels.items():
            entry = pwd.getpwnam(user)
            groups = sorted(set(os.getgrouplist(user, entry.pw_gid)))
            expected = (
                f"{entry.pw_uid} {entry.pw_gid} {groups} {entry.pw_dir} {os.path.dirname(tree[user])}\n"
            )
            assert k.stdout(probe) == expected
            banner = k.client.kernel_info(reply=True)["content"]["banner"]
            assert f"runs as Unix user {user!r}" in banner
    finally:
        for k in kernels.values():
            k.close()


def test_state_completion_and_magics(kernel):
    kernel.run("pftest_variable = 41")
    assert kernel.stdout("print(pftest_variable + 1)") == "42\n"
    reply = kernel.client.complete("pftest_var", reply=True)["content"]
    assert "pftest_variable" in reply["matches"]
    assert kernel.stdout("%cd ~\nimport os; print(os.getcwd() == os.path.expanduser('~'))").endswith("True\n")


def test_input_is_answered_through_stdin(kernel):
    client = kernel.client
    msg_id = client.execute("answer = input('name? ')", allow_stdin=True)
    request = client.get_stdin_msg(timeout=30)
    assert request["content"]["prompt"] == "name? "
    client.input("ada")
    client.get_shell_msg(timeout=30)
    assert msg_id
    assert kernel.stdout("print(answer)") == "ada\n"


def test_interrupt_stops_a_sleep(kernel):
    client = kernel.client
    client.execute("import time; time.sleep(60)")
    time.sleep(1)
    start = time.monotonic()
    kernel.manager.interrupt_kernel()
    reply = client.get_shell_msg(timeout=10)["content"]
    assert reply["status"] == "error" and reply["ename"] == "KeyboardInterrupt"
    assert time.monotonic() - start < 5


def test_restart_gives_a_fresh_namespace_as_the_same_user(kernel, users):
    kernel.run("leftover = 1")
    kernel.manager.restart_kernel(now=True)
    kernel.client.wait_for_ready(timeout=60)
    assert (
        kernel.stdout("import getpass; print(getpass.getuser(), 'leftover' in dir())")
        == f"{users.student1} False\n"
    )


def test_matplotlib_and_widgets(kernel):
    reply, outputs = kernel.run(
        "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3])\nplt.show()", timeout=120
    )
    assert reply["status"] == "ok"
    assert any(
        "image/png" in m["content"].get("data", {}) for m in outputs if m["msg_type"] == "display_data"
    )
    reply, outputs = kernel.run("import ipywidgets\nipywidgets.IntSlider(value=3)", timeout=120)
    assert reply["status"] == "ok", reply
    assert any(m["msg_type"] == "comm_open" for m in outputs)


def test_server_token_is_not_inherited(kernel):
    out = kernel.stdout(
        "import os\nprint(os.environ.get('JUPYTER_TOKEN'), open('/proc/self/environ', 'rb').read().count(b'"
        + TOKEN
        + "'))"
    )
    assert out == "None 0\n"


def test_connection_file_is_private_to_the_owner(kernel, users):
    out = kernel.stdout(
        "import os, stat\nfrom ipykernel.connect import get_connection_file\n"
        "st = os.stat(get_connection_file())\nprint(oct(stat.S_IMODE(st.st_mode)), st.st_uid)"
    )
    assert out == f"0o600 {pwd.getpwnam(users.student1).pw_uid}\n"


def test_another_user_cannot_drive_the_kernel(kernel, users, shared_dir):
    """student2 knows the ports but not the key: the kernel ignores it."""
    info = kernel.manager.get_connection_info()
    script = os.path.join(shared_dir, "intruder.py")
    with open(script, "w") as f:
        f.write(
            textwrap.dedent(
                f"""
                import queue
                from jupyter_client import BlockingKernelClient
                client = BlockingKernelClient(ip={info["ip"]!r}, shell_port={info["shell_port"]},
                    iopub_port={info["iopub_port"]}, stdin_port={info["stdin_port"]},
                    hb_port={info["hb_port"]}, control_port={info["control_port"]}, key=b"guess")
                client.start_channels()
                client.execute("import os; os.system('touch /tmp/pwned')")
                try:
                    client.get_shell_msg(timeout=3)
                    print("answered")
                except queue.Empty:
                    print("ignored")
                """
            )
        )
    out = subprocess.run(
        ["runuser", "-u", users.student2, "--", sys.executable, script],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.stdout.strip() == "ignored", out.stderr
    assert kernel.stdout("print(1)") == "1\n"


def test_a_dying_kernel_is_noticed_and_leaves_nothing(tree, users):
    k = Kernel(tree[users.student1])
    try:
        k.client.execute("import subprocess; subprocess.Popen(['sleep', '300']); import os; os._exit(3)")
        deadline = time.monotonic() + 10
        while k.manager.is_alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not k.manager.is_alive()
    finally:
        k.close()
    assert _processes_of(users.student1) == []


def test_shutdown_leaves_no_process_or_files(tree, users):
    k = Kernel(tree[users.student1])
    k.run("import subprocess; child = subprocess.Popen(['sleep', '300'])")
    connection_file = k.stdout("from ipykernel.connect import get_connection_file as f; print(f())")
    k.client.stop_channels()
    k.manager.shutdown_kernel()  # as JupyterLab's "Shut Down Kernel" does
    time.sleep(0.5)
    assert _processes_of(users.student1) == []
    assert not os.path.exists(os.path.dirname(connection_file.strip()))


def _processes_of(user: str) -> list[str]:
    out = subprocess.run(["pgrep", "-a", "-u", user], capture_output=True, text=True)
    return out.stdout.splitlines()


@pytest.mark.parametrize(
    ("owner", "message"),
    [("root", "uid 0"), ("daemon", "below min_uid"), (54321, "has no account")],
)
def test_refused_owner_gives_a_clear_start_error(shared_dir, users, owner, message):
    path = os.path.join(shared_dir, "refused.ipynb")
    with open(path, "w") as f:
        f.write("{}")
    uid = owner if isinstance(owner, int) else pwd.getpwnam(owner).pw_uid
    os.chown(path, uid, 0)
    start = time.monotonic()
    with pytest.raises(PipeforkError, match=message):
        launch(path)
    assert time.monotonic() - start < 10
    assert get_engine().forkserver.status()["active"] == [], "a refused kernel must not be forked"
