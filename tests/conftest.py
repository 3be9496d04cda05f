"""Shared fixtures: real throwaway Unix users and engines forking as them.

The suite runs as root (as CI does).  Tests that need root skip with a reason
elsewhere.  Children that drop to a test user can only import what that user
can read, so the suite must run from a world-readable environment (see the
README's test command, which builds one under /opt).
"""

from __future__ import annotations

import asyncio
import inspect
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from traitlets.config import Config

from pipefork_kernel import Engine

IS_ROOT = os.geteuid() == 0
#: Several suites may run at once on one machine (e.g. while developing): give each its own prefix.
USER_PREFIX = os.environ.get("PIPEFORK_TEST_USER_PREFIX", "pftest_")
EXTRA_GROUP = f"{USER_PREFIX}extra"


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    """Run ``async def`` tests on the current loop: the one pytest-jupyter's server uses."""
    if not inspect.iscoroutinefunction(pyfuncitem.obj):
        return None
    args = {name: pyfuncitem.funcargs[name] for name in pyfuncitem._fixtureinfo.argnames}
    loop = pyfuncitem.funcargs.get("jp_asyncio_loop")
    if loop is None:
        asyncio.run(pyfuncitem.obj(**args))
    else:
        loop.run_until_complete(pyfuncitem.obj(**args))
    return True


def _world_readable(path: str) -> bool:
    path = os.path.realpath(path)
    while True:
        if os.stat(path).st_mode & 0o005 != 0o005:
            return False
        if path == "/":
            return True
        path = os.path.dirname(path)


needs_root = pytest.mark.skipif(not IS_ROOT, reason="switching users needs root")


def pytest_collection_modifyitems(config, items):
    if IS_ROOT and not _world_readable(sys.prefix):
        reason = (
            f"{sys.prefix} is not world-readable, so test users cannot import from it; "
            "run the suite with the README's test command (it builds /opt/pipefork)"
        )
        for item in items:
            if "users" in item.fixturenames:
                item.add_marker(pytest.mark.skip(reason=reason))


@dataclass(frozen=True)
class TestUsers:
    student1: str
    student2: str
    grouped: str
    extra_group: str
    home_root: str


def _useradd(name: str, *extra: str) -> None:
    subprocess.run(["userdel", "-r", name], capture_output=True)
    subprocess.run(["useradd", "--create-home", "--shell", "/bin/bash", *extra, name], check=True)


@pytest.fixture(scope="session")
def users() -> Iterator[TestUsers]:
    """Three throwaway accounts; one of them also in an extra group."""
    if not IS_ROOT:
        pytest.skip("creating users needs root")
    subprocess.run(["groupdel", EXTRA_GROUP], capture_output=True)
    subprocess.run(["groupadd", EXTRA_GROUP], check=True)
    names = [f"{USER_PREFIX}student1", f"{USER_PREFIX}student2", f"{USER_PREFIX}grouped"]
    _useradd(names[0])
    _useradd(names[1])
    _useradd(names[2], "--groups", EXTRA_GROUP)
    yield TestUsers(*names, extra_group=EXTRA_GROUP, home_root="/home")
    for name in names:
        subprocess.run(["pkill", "-KILL", "-u", name], capture_output=True)
        subprocess.run(["userdel", "-r", name], capture_output=True)
    subprocess.run(["groupdel", EXTRA_GROUP], capture_output=True)


@pytest.fixture
def shared_dir() -> Iterator[str]:
    """A directory every test user can reach (pytest's tmp_path is 0700)."""
    path = tempfile.mkdtemp(prefix="pipefork-test-", dir="/var/tmp")
    os.chmod(path, 0o1777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _configured_engine(settings: dict) -> Engine:
    config = Config()
    for key, value in settings.items():
        section, trait = key.split("__")
        config[section][trait] = value
    return Engine(config=config)


@pytest.fixture
def make_engine(users) -> Iterator:
    """Factory of engines with their own fork server; settings are ``Class__trait=value``.

    Every engine it made is closed (its fork server stopped) after the test.
    """
    made: list[Engine] = []

    def factory(**settings) -> Engine:
        made.append(_configured_engine(settings))
        return made[-1]

    yield factory
    for eng in made:
        eng.close()


@pytest.fixture(scope="session")
def engine(users) -> Iterator[Engine]:
    """One engine (and fork server) shared by the tests that need no special settings."""
    eng = _configured_engine({"RunLimits__default_timeout": 60.0})
    yield eng
    eng.close()
