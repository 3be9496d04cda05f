"""binder/ builds: requirements + postBuild in a fresh venv, then demo.ipynb runs as a normal user.

This mirrors what repo2docker does: a copy of the repository, ``pip install -r
binder/requirements.txt``, then ``binder/postBuild`` from the repository root.
The venv is a plain one (no system site-packages) made by ``/usr/bin/python3``,
so everything comes from the package index.  Binder does not run as root, so
the demo is executed with ``jupyter nbconvert --execute`` as a throwaway user.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import time
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parent.parent
BASE_PYTHON = "/usr/bin/python3"
#: Installing JupyterLab, matplotlib and pipefork's dependencies from the index.
INSTALL_TIMEOUT = 900

pytestmark = pytest.mark.timeout(INSTALL_TIMEOUT + 300)


def run(argv: list[str], what: str, timeout: float = INSTALL_TIMEOUT, **kwargs) -> str:
    started = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kwargs)
    print(f"{what}: {time.monotonic() - started:.1f} s")
    if proc.returncode != 0:
        pytest.fail(f"{what} failed with {proc.returncode}:\n{proc.stdout[-5000:]}\n{proc.stderr[-5000:]}")
    return proc.stdout + proc.stderr


def copy_repository(dest: Path) -> Path:
    """What repo2docker builds from: the checkout without its git metadata and caches."""
    junk = shutil.ignore_patterns(".git", "__pycache__", "*.pyc", ".*_cache", "*.egg-info")
    shutil.copytree(REPO, dest, ignore=junk)
    os.chmod(dest, 0o755)  # the checkout may sit in a 0700 dir (mktemp -d); copytree copies that mode
    return dest


@pytest.fixture
def binder_env(shared_dir) -> tuple[Path, Path]:
    """(copy of the repository, fresh venv) after requirements.txt and postBuild, both world-readable."""
    if not os.access(BASE_PYTHON, os.X_OK):
        pytest.skip(f"{BASE_PYTHON} is missing")
    old_umask = os.umask(0o022)
    try:
        repo = copy_repository(Path(shared_dir) / "repo")
        venv = Path(shared_dir) / "venv"
        run([BASE_PYTHON, "-m", "venv", str(venv)], "python -m venv", timeout=120)
        env = {
            **os.environ,
            "PATH": f"{venv}/bin:{os.environ.get('PATH', '/usr/bin:/bin')}",
            "VIRTUAL_ENV": str(venv),
        }
        for name in ("PYTHONPATH", "PYTHONHOME", "JUPYTER_PATH", "JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR"):
            env.pop(name, None)
        run(
            ["python", "-m", "pip", "install", "-q", "-r", "binder/requirements.txt"],
            "pip install -r binder/requirements.txt",
            cwd=repo,
            env=env,
        )
        run([str(repo / "binder" / "postBuild")], "binder/postBuild", cwd=repo, env=env)
    finally:
        os.umask(old_umask)
    return repo, venv


def as_user(user: str, venv: Path, argv: list[str], what: str, cwd: str) -> str:
    """Run ``argv`` as ``user`` with a clean environment, the venv first on PATH."""
    home = pwd.getpwnam(user).pw_dir
    clean = ["env", "-i", f"HOME={home}", f"USER={user}", f"PATH={venv}/bin:/usr/bin:/bin", "LANG=C.UTF-8"]
    return run(["runuser", "-u", user, "--", *clean, *argv], what, timeout=600, cwd=cwd)


def test_postbuild_then_demo_runs_as_a_normal_user(binder_env, users, shared_dir):
    repo, venv = binder_env
    user = users.student1

    specs = as_user(user, venv, ["jupyter", "kernelspec", "list"], "kernelspec list", shared_dir)
    assert "pipefork" in specs and str(venv) in specs, specs
    extensions = as_user(user, venv, ["jupyter", "server", "extension", "list"], "extension list", shared_dir)
    extensions = re.sub(r"\x1b\[[0-9;]*m", "", extensions)  # colours
    assert re.search(r"jupyter_server_ext\s+enabled", extensions), extensions

    executed = os.path.join(shared_dir, "demo-executed.ipynb")
    as_user(
        user,
        venv,
        [
            "jupyter",
            "nbconvert",
            "--to",
            "notebook",
            "--execute",
            "--ExecutePreprocessor.timeout=120",
            str(repo / "binder" / "demo.ipynb"),
            "--output",
            executed,
        ],
        "nbconvert --execute binder/demo.ipynb",
        shared_dir,
    )

    notebook = nbformat.read(executed, as_version=4)
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert f"this kernel runs as {user}" in text
    assert "timeout after" in text and "RunTimeout:" in text
    assert "crashed, exit code 3" in text and "signal 11" in text and "ChildCrashed:" in text
    assert f"{user} pid" in text and "tick 2" in text  # %%run_as $me
    assert "needs root" in text  # asking for someone else
    assert any("image/png" in o.get("data", {}) for o in outputs), "the forked child's figure is missing"
