"""End to end in a real browser: JupyterLab launched as root, each notebook run as its owner.

Playwright's Python package drives Debian's ``chromium`` (``/usr/bin/chromium``,
or ``$PIPEFORK_CHROMIUM``; Playwright's own browser download is not used).  The
test starts ``jupyter lab`` as root over a tree where two throwaway users each
own a notebook with the ``pipefork`` kernel and root owns an admin notebook that
uses ``%%run_as``, then, in the browser:

1. opens student 1's notebook, runs all cells, and sees student 1's name, uid
   and a matplotlib figure;
2. does the same for student 2 in a second tab;
3. opens the admin notebook, runs ``%%run_as student1``, and sees its lines
   arrive one by one, before the run has finished.

Screenshots (one per tab, on success and on failure) go to the test's
``tmp_path``; the path is printed.  When ``CI`` is set, a missing browser or
Playwright is a failure, not a skip.  Deselect locally with ``-m "not e2e"``.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

try:
    from playwright.sync_api import BrowserContext, Page, expect, sync_playwright
except ImportError:  # reported by require_browser(), which fails in CI and skips elsewhere
    sync_playwright = None

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

#: Debian's chromium; PIPEFORK_CHROMIUM points elsewhere (e.g. on Ubuntu, where apt has only a snap).
CHROMIUM = os.environ.get("PIPEFORK_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",  # chromium refuses to run as root with its sandbox
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
#: JupyterLab's first load on two noisy cores can take half a minute.
LOAD_TIMEOUT_MS = 120_000
OUTPUT_TIMEOUT_MS = 90_000
SERVER_START_TIMEOUT = 120.0
TICKS = 3
#: Display names of the kernelspecs, as JupyterLab's status bar shows them.
PIPEFORK_KERNEL = "Python 3 (pipefork)"
ADMIN_KERNEL = "Python 3 (ipykernel)"


def require_browser() -> None:
    """Fail (in CI) or skip (elsewhere), saying what to install, before JupyterLab starts."""
    problems = []
    if sync_playwright is None:
        problems.append("the Python package 'playwright' is not installed (pip install 'pipefork[test]')")
    if not os.access(CHROMIUM, os.X_OK):
        problems.append(
            f"{CHROMIUM} is missing (apt-get install chromium, as tools/test does, or set PIPEFORK_CHROMIUM)"
        )
    try:
        import jupyterlab  # noqa: F401
    except ImportError:
        problems.append("the Python package 'jupyterlab' is not installed (pip install 'pipefork[test]')")
    if not problems:
        return
    message = "the browser end-to-end test cannot run: " + "; ".join(problems)
    if os.environ.get("CI"):
        pytest.fail(message + " (CI is set: this test must run there, so it fails instead of skipping)")
    pytest.skip(message)


# --- the notebook tree --------------------------------------------------------------


def student_cells() -> list:
    return [
        new_markdown_cell("A student's notebook: its pipefork kernel runs as the file's owner."),
        new_code_cell(
            "import getpass, os\nprint(f'whoami: {getpass.getuser()} uid={os.getuid()} pid={os.getpid()}')"
        ),
        new_code_cell(
            "import matplotlib.pyplot as plt\n"
            "plt.plot([1, 4, 9, 16], marker='o')\n"
            "plt.title(f'drawn by {getpass.getuser()}')\n"
            "plt.show()"
        ),
    ]


def admin_cells(student: str) -> list:
    return [
        new_markdown_cell("The admin's notebook: a root kernel that runs one cell as a student."),
        new_code_cell("%load_ext pipefork_kernel"),
        new_code_cell(
            f"%%run_as {student} --timeout 60\n"
            "import getpass, time\n"
            f"for i in range({TICKS}):\n"
            "    print(f'tick {i} from {getpass.getuser()}', flush=True)\n"
            "    time.sleep(1)"
        ),
    ]


def write_notebook(path: str, cells: list, owner: str, kernel: str, display_name: str) -> None:
    entry = pwd.getpwnam(owner)
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    os.chown(folder, entry.pw_uid, entry.pw_gid)
    os.chmod(folder, 0o755)
    notebook = new_notebook(cells=cells)
    notebook.metadata["kernelspec"] = {"name": kernel, "display_name": display_name, "language": "python"}
    nbformat.write(notebook, path)
    os.chown(path, entry.pw_uid, entry.pw_gid)
    os.chmod(path, 0o644)


@pytest.fixture
def tree(shared_dir, users) -> str:
    """students/<user>/hw.ipynb owned by each student; admin/grade.ipynb owned by root."""
    root = os.path.join(shared_dir, "tree")
    os.makedirs(root)
    os.chmod(root, 0o755)
    for user in (users.student1, users.student2):
        write_notebook(
            os.path.join(root, "students", user, "hw.ipynb"),
            student_cells(),
            user,
            "pipefork",
            PIPEFORK_KERNEL,
        )
    write_notebook(
        os.path.join(root, "admin", "grade.ipynb"),
        admin_cells(users.student1),
        "root",
        "python3",
        ADMIN_KERNEL,
    )
    return root


# --- JupyterLab, as root ----------------------------------------------------------


@dataclass
class Lab:
    process: subprocess.Popen
    url: str
    token: str
    log_path: Path
    stopped: bool = False

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError as exc:
            return f"(no server log: {exc})"

    def stop(self) -> None:
        """SIGTERM (Jupyter shuts its kernels down), then SIGKILL the whole group."""
        if self.stopped:
            return
        self.stopped = True
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def quiet_lab_settings(settings_dir: Path) -> None:
    """No 'would you like news?' toast over the screenshots, no requests to the Internet."""
    folder = settings_dir / "@jupyterlab" / "apputils-extension"
    folder.mkdir(parents=True)
    (folder / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False})
    )


def wait_until_serving(lab: Lab) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while time.monotonic() < deadline:
        if lab.process.poll() is not None:
            pytest.fail(f"jupyter lab exited with {lab.process.returncode}:\n{lab.log_tail()}")
        try:
            with urllib.request.urlopen(f"{lab.url}/api/status?token={lab.token}", timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    pytest.fail(f"jupyter lab did not answer within {SERVER_START_TIMEOUT:.0f} s:\n{lab.log_tail()}")


@contextmanager
def running_lab(tree: str, tmp_path: Path) -> Iterator[Lab]:
    """`jupyter lab` as root on a free loopback port, with its own config, runtime and settings."""
    port, token = free_port(), secrets.token_hex(16)
    home = tmp_path / "jupyter"
    quiet_lab_settings(home / "settings")
    env = {
        **os.environ,
        # Keep root's own ~/.jupyter (config, kernelspecs, workspaces) out of the test.
        "JUPYTER_CONFIG_DIR": str(home / "config"),
        "JUPYTER_DATA_DIR": str(home / "data"),
        "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
    }
    env.pop("JUPYTER_TOKEN", None)
    log_path = tmp_path / "jupyter-lab.log"
    argv = [
        sys.executable,
        "-m",
        "jupyter",
        "lab",
        "--allow-root",
        "--no-browser",
        "--ip",
        "127.0.0.1",
        "--port",
        str(port),
        "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={tree}",
        f"--LabApp.workspaces_dir={home / 'workspaces'}",
        f"--LabApp.user_settings_dir={home / 'settings'}",
    ]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            argv, cwd=tree, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    server = Lab(process, f"http://127.0.0.1:{port}", token, log_path)
    try:
        wait_until_serving(server)
        yield server
    finally:
        server.stop()
        print(f"JupyterLab log: {log_path}")


# --- the browser --------------------------------------------------------------------


@dataclass
class Browser:
    context: BrowserContext
    pages: dict[str, Page] = field(default_factory=dict)

    def open(self, name: str, lab: Lab, path: str) -> Page:
        """A new tab on ``path``, in its own JupyterLab workspace (so tabs do not restore each other)."""
        page = self.context.new_page()
        self.pages[name] = page
        page.goto(f"{lab.url}/lab/workspaces/{name}/tree/{path}?token={lab.token}", timeout=LOAD_TIMEOUT_MS)
        return page

    def screenshots(self, folder: Path, prefix: str) -> list[Path]:
        taken = []
        for name, page in self.pages.items():
            path = folder / f"{prefix}-{name}.png"
            try:
                page.screenshot(path=str(path), full_page=True)
                taken.append(path)
            except Exception as exc:  # noqa: BLE001 - a failed screenshot must not hide the failure
                print(f"could not take a screenshot of {name}: {exc}")
        return taken


@contextmanager
def chromium_tabs() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True, timeout=60_000
        )
        context = chromium.new_context(viewport={"width": 1280, "height": 1000})
        try:
            yield Browser(context)
        finally:
            context.close()
            chromium.close()


def notebook(page: Page):
    return page.locator(".jp-NotebookPanel")


def wait_for_idle_kernel(page: Page, what: str, kernel: str) -> None:
    """Wait until the notebook's kernel is connected and idle.

    The toolbar's execution indicator says "idle" for a moment before the session
    has a kernel at all (and "Run All" then does nothing), so the status bar's
    "<kernel> | Idle", which follows the real kernel, must agree with it.
    """
    status = page.locator("#jp-main-statusbar").get_by_text(f"{kernel} | Idle", exact=True)
    expect(status, f"the kernel of {what} never became idle").to_be_visible(timeout=LOAD_TIMEOUT_MS)
    indicator = notebook(page).locator(".jp-Notebook-ExecutionIndicator")
    expect(indicator, f"the kernel of {what} never became idle").to_have_attribute(
        "data-status", "idle", timeout=LOAD_TIMEOUT_MS
    )


def run_all_cells(page: Page, what: str, kernel: str) -> None:
    """Wait for an idle kernel, focus the notebook, then Run → Run All Cells from the menu bar."""
    wait_for_idle_kernel(page, what, kernel)
    notebook(page).locator(".jp-Cell .jp-InputPrompt").first.click()
    page.get_by_role("menuitem", name="Run", exact=True).click()
    page.get_by_role("menuitem", name="Run All Cells", exact=True).click()


def outputs(page: Page):
    return notebook(page).locator(".jp-OutputArea-output")


def check_student_notebook(page: Page, user: str, other: str) -> int:
    """Run a student's notebook; its outputs show the owner and a figure.  Returns the kernel's pid."""
    run_all_cells(page, f"{user}'s notebook", PIPEFORK_KERNEL)
    uid = pwd.getpwnam(user).pw_uid
    whoami = outputs(page).filter(has_text=re.compile(rf"whoami: {re.escape(user)} uid={uid} pid=\d+"))
    expect(whoami, f"{user}'s name and uid never appeared").to_have_count(1, timeout=OUTPUT_TIMEOUT_MS)
    figure = outputs(page).locator("img")
    expect(figure, f"{user}'s matplotlib figure never appeared").to_be_visible(timeout=OUTPUT_TIMEOUT_MS)
    assert figure.evaluate("img => img.naturalWidth") > 100, "the figure is not a real image"
    wait_for_idle_kernel(page, f"{user}'s notebook", PIPEFORK_KERNEL)
    text = outputs(page).all_inner_texts()
    assert not any("Traceback" in t for t in text), "\n".join(text)
    assert not any(other in t for t in text), f"{other} showed up in {user}'s notebook"
    return int(re.search(r"pid=(\d+)", whoami.inner_text()).group(1))


def check_admin_notebook(page: Page, student: str) -> None:
    """Run the admin's %%run_as cell; its lines arrive one by one, while the run goes on."""
    run_all_cells(page, "the admin notebook", ADMIN_KERNEL)
    first = outputs(page).filter(has_text=f"tick 0 from {student}")
    last = outputs(page).filter(has_text=f"tick {TICKS - 1} from {student}")
    expect(first, "the %%run_as cell's first line never appeared").to_be_visible(timeout=OUTPUT_TIMEOUT_MS)
    assert last.count() == 0, "the %%run_as output only appeared once the run had ended"
    expect(last, "the %%run_as cell's last line never appeared").to_be_visible(timeout=OUTPUT_TIMEOUT_MS)
    wait_for_idle_kernel(page, "the admin notebook", ADMIN_KERNEL)
    text = "\n".join(outputs(page).all_inner_texts())
    assert "Traceback" not in text and "Error" not in text, text
    assert re.findall(rf"tick \d from {student}", text) == [f"tick {i} from {student}" for i in range(TICKS)]


def process_owner(pid: int) -> str | None:
    try:
        return pwd.getpwuid(os.stat(f"/proc/{pid}").st_uid).pw_name
    except FileNotFoundError:
        return None


def test_jupyterlab_runs_each_notebook_as_its_owner(users, tree, tmp_path):
    require_browser()
    print(f"\nscreenshots and logs: {tmp_path}")
    a, b = users.student1, users.student2
    with running_lab(tree, tmp_path) as lab, chromium_tabs() as browser:
        try:
            page_a = browser.open("student1", lab, f"students/{a}/hw.ipynb")
            pid_a = check_student_notebook(page_a, a, other=b)
            assert process_owner(pid_a) == a, "the kernel process is not owned by the notebook's owner"

            page_b = browser.open("student2", lab, f"students/{b}/hw.ipynb")
            pid_b = check_student_notebook(page_b, b, other=a)
            assert process_owner(pid_b) == b
            assert pid_a != pid_b

            page_admin = browser.open("admin", lab, "admin/grade.ipynb")
            check_admin_notebook(page_admin, a)

            # A's tab still holds A's outputs after B's and the admin's runs.
            expect(outputs(page_a).filter(has_text=f"whoami: {a}")).to_have_count(1)
            shots = browser.screenshots(tmp_path, "success")
            print("success screenshots:", *shots, sep="\n  ")
        except BaseException:
            shots = browser.screenshots(tmp_path, "failure")
            print("failure screenshots:", *shots, sep="\n  ")
            print(f"JupyterLab log (tail):\n{lab.log_tail()}")
            raise

    # JupyterLab has stopped: the students' kernels ended with it, and the notebooks
    # JupyterLab (root) touched still belong to their owners.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (process_owner(pid_a) or process_owner(pid_b)):
        time.sleep(0.2)
    assert process_owner(pid_a) is None and process_owner(pid_b) is None, "kernels outlived JupyterLab"
    for user in (a, b):
        path = os.path.join(tree, "students", user, "hw.ipynb")
        assert pwd.getpwuid(os.stat(path).st_uid).pw_name == user
