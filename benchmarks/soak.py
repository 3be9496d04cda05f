"""Soak-and-fault harness: does pipefork keep serving through anything students' code does?

Run as root from the world-readable venv, on the machine a class will use::

    /opt/pipefork/bin/python benchmarks/soak.py --duration 600
    /opt/pipefork/bin/python benchmarks/soak.py --runs 2000 --concurrency 12

It creates throwaway users (``pfsoak_a`` ... and ``pfsoak_bomb``), a notebook
tree they own and a real Jupyter Server with the pipefork extension as root
(loopback, a token per person), then drives it over REST from several people
at once, and an ``Engine`` in this process directly, with a weighted mix of
normal and hostile cells: crashes, timeouts, output floods, garbage frames,
escaping sleepers, fork and memory bombs, clients hanging up, and once the
fork server SIGKILLed.  At the end it prints one table (every kind's expected
and observed status, latency of normal runs beside the faults, and leak
checks) and exits non-zero if any check failed.  Everything it created is
removed, also on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hmac
import json
import math
import os
import pickle
import pwd
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import dill
from jupyter_server.auth.identity import IdentityProvider, User
from tornado.httpclient import HTTPRequest, HTTPResponse
from tornado.simple_httpclient import SimpleAsyncHTTPClient
from traitlets import Dict, Unicode
from traitlets.config import Config

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
ADMIN = "soakadmin"
BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
#: A 1x1 PNG: rich display with binary data, without importing matplotlib in every run.
PNG_1X1 = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)
#: Statuses a run may also end with when the fork server was SIGKILLed while it was going.
KILLED_UNDER_IT = frozenset({"crashed", "http_500", "engine:ForkServerError"})
#: Seconds after the fork-server kill in which a new request may still meet the dying one.
KILL_WINDOW = 1.0
#: The multi-process run at the fork-server kill: sleepers recognizable by their argument.
POOL_SLEEP, POOL_SIZE = 611, 3
#: Where runs might leave files behind as the test users.
SHARED_TMP_DIRS = ("/tmp", "/var/tmp", "/dev/shm")


# --- identities: one token per person ---------------------------------------------------


class TokenIdentityProvider(IdentityProvider):
    """One token per identity, as a hub hands each person their own API token.

    Jupyter's own token login knows a single anonymous person; the soak needs
    several people at once, each allowed by RunPolicy to run only as themself,
    plus one admin.  Loaded by the soak server from its generated config file.
    """

    identities = Dict(Unicode(), config=True, help="token -> identity (Jupyter username)")

    def get_user(self, handler: Any) -> User | None:
        given = (self.get_token(handler) or "").encode()
        for token, name in self.identities.items():
            if hmac.compare_digest(given, token.encode()):
                handler._token_authenticated = True
                return User(username=name)
        return None


# --- settings ----------------------------------------------------------------------------


@dataclass
class SoakConfig:
    """What to run, how hard, and the limits the server enforces."""

    duration: float | None = None
    runs: int | None = None
    concurrency: int = 16
    engine_share: float = 0.25
    seed: int = 1
    user_prefix: str = "pfsoak_"
    users: int = 3
    recreate_users: bool = False
    kill_at: float = 0.4
    client_margin: float = 30.0
    max_output_bytes: int = 256 * KiB
    rlimit_nproc: int = 128
    rlimit_as: int = 768 * MiB
    kill_grace: float = 0.5
    max_p99: float = 5.0
    max_rss_growth_mib: float = 48.0
    max_seconds: float | None = None
    skip_garbage: tuple[str, ...] = ()
    python: str = sys.executable
    keep_workdir: bool = False
    verbose: bool = True

    def hard_limit(self) -> float:
        """Seconds after which no new run starts, targets met or not."""
        if self.max_seconds is not None:
            return self.max_seconds
        return 2 * (self.duration or 0) + 600

    def targets_met(self, elapsed: float, runs: int) -> bool:
        """Both targets (when given) reached: ``--duration 600 --runs 20000`` means both."""
        runs_ok = self.runs is None or runs >= self.runs
        time_ok = self.duration is None or elapsed >= self.duration
        return runs_ok and time_ok

    def progress(self, elapsed: float, runs: int) -> float:
        """Fraction of the way to the targets (0..1): when to kill the fork server."""
        parts = []
        if self.runs:
            parts.append(runs / self.runs)
        if self.duration:
            parts.append(elapsed / self.duration)
        return min(parts) if parts else 1.0


def log(config: SoakConfig, text: str) -> None:
    if config.verbose:
        print(f"[soak {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# --- the world: users, their notebooks, private temp dirs ---------------------------------


@dataclass
class World:
    """Throwaway users and the directories the soak owns."""

    workdir: str
    people: list[str]
    bomber: str
    uids: dict[str, int]
    #: Files in the shared temp dirs owned by our uids before any run: left by earlier
    #: accounts that had the same (recycled) uid, not by this soak.
    stale_files: set[str] = field(default_factory=set)

    @property
    def root_dir(self) -> str:
        return os.path.join(self.workdir, "notebooks")

    @property
    def server_tmp(self) -> str:
        return os.path.join(self.workdir, "tmp-server")

    @property
    def engine_tmp(self) -> str:
        return os.path.join(self.workdir, "tmp-engine")

    def notebook(self, user: str) -> str:
        return f"{user}/nb.ipynb"


def _account_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _remove_user(name: str) -> None:
    """Kill what the user still runs, wait for it to be gone (userdel refuses otherwise), delete."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        subprocess.run(["pkill", "-KILL", "-u", name], capture_output=True, check=False)
        if subprocess.run(["pgrep", "-u", name], capture_output=True, check=False).returncode != 0:
            break
        time.sleep(0.1)
    subprocess.run(["userdel", "-r", name], capture_output=True, check=False)


def _create_users(config: SoakConfig, names: list[str], created: list[str]) -> dict[str, int]:
    """Create the accounts, noting each in ``created`` at once so a failure still cleans up."""
    existing = [n for n in names if _account_exists(n)]
    if existing and not config.recreate_users:
        # Never delete an account this run did not create.
        raise SystemExit(
            f"users {existing} already exist (another soak is running, or a killed one left them): "
            f"pass --recreate-users to replace them, or another --user-prefix"
        )
    for name in names:
        if _account_exists(name):
            _remove_user(name)
        created.append(name)
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/bash", name], check=True)
    return {name: pwd.getpwnam(name).pw_uid for name in names}


def _make_notebooks(world: World) -> None:
    os.makedirs(world.root_dir, mode=0o755)
    for user in [*world.people, world.bomber]:
        entry = pwd.getpwnam(user)
        folder = os.path.join(world.root_dir, user)
        os.makedirs(folder)
        path = os.path.join(world.root_dir, world.notebook(user))
        with open(path, "w") as f:
            f.write('{"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}')
        for item in (folder, path):
            os.chown(item, entry.pw_uid, entry.pw_gid)


@contextlib.contextmanager
def world(config: SoakConfig) -> Iterator[World]:
    """Users and a work tree for one soak, removed afterwards whatever happens."""
    letters = "abcdefghijklmnopqrstuvwxyz"[: config.users]
    people = [f"{config.user_prefix}{c}" for c in letters]
    bomber = f"{config.user_prefix}bomb"
    workdir = tempfile.mkdtemp(prefix="pfsoak-", dir="/var/tmp")
    os.chmod(workdir, 0o755)
    created: list[str] = []
    try:
        uids = _create_users(config, [*people, bomber], created)
        made = World(workdir, people, bomber, uids)
        for private in (made.server_tmp, made.engine_tmp):
            os.makedirs(private, mode=0o700)
        _make_notebooks(made)
        made.stale_files = set(files_owned_by(set(uids.values()), SHARED_TMP_DIRS, workdir))
        yield made
    finally:
        for name in created:
            _remove_user(name)
        if not config.keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)


# --- the server ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SERVER_CONFIG = """\
# Generated by benchmarks/soak.py for one soak run; holds tokens (mode 0600).
import sys

sys.path.insert(0, {bench_dir!r})
from soak import TokenIdentityProvider

c.ServerApp.identity_provider_class = TokenIdentityProvider
c.TokenIdentityProvider.identities = {identities!r}
c.TokenIdentityProvider.token = {admin_token!r}
c.ServerApp.jpserver_extensions = {{"jupyter_server_ext": True}}
c.ServerApp.open_browser = False
c.RunPolicy.admin_identities = [{admin!r}]
c.ForkServer.runtime_dir = {runtime_dir!r}
c.ForkServer.max_runs_per_user = {max_runs_per_user!r}
c.PipeforkApp.max_timeout = 120.0
c.RunLimits.rlimit_nproc = {rlimit_nproc!r}
c.RunLimits.rlimit_as = {rlimit_as!r}
c.RunLimits.max_output_bytes = {max_output_bytes!r}
c.RunLimits.kill_grace = {kill_grace!r}
"""


@dataclass
class Server:
    """A real ``jupyter server`` as root with the extension, on a loopback port."""

    process: subprocess.Popen
    port: int
    tokens: dict[str, str]
    log_path: str

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"


def limits_config(config: SoakConfig) -> dict[str, Any]:
    """RunLimits both the server and the in-process engine enforce."""
    return {
        "rlimit_nproc": config.rlimit_nproc,
        "rlimit_as": config.rlimit_as,
        "max_output_bytes": config.max_output_bytes,
        "kill_grace": config.kill_grace,
    }


def _write_server_config(config: SoakConfig, world_: World, tokens: dict[str, str]) -> str:
    path = os.path.join(world_.workdir, "soak_server_config.py")
    text = SERVER_CONFIG.format(
        bench_dir=BENCH_DIR,
        identities={token: name for name, token in tokens.items()},
        admin_token=tokens[ADMIN],
        admin=ADMIN,
        runtime_dir=world_.server_tmp,
        max_runs_per_user=config.concurrency + 4,
        **limits_config(config),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


def _server_env(world_: World) -> dict[str, str]:
    """A small environment: nothing of the caller's, Jupyter's dirs inside the work tree."""
    env = {k: os.environ[k] for k in ("PATH", "LANG", "LC_ALL", "TZ") if k in os.environ}
    jupyter = os.path.join(world_.workdir, "jupyter")
    env.update(
        HOME=jupyter,
        TMPDIR=world_.server_tmp,
        JUPYTER_CONFIG_DIR=os.path.join(jupyter, "config"),
        JUPYTER_DATA_DIR=os.path.join(jupyter, "data"),
        JUPYTER_RUNTIME_DIR=os.path.join(jupyter, "runtime"),
        IPYTHONDIR=os.path.join(jupyter, "ipython"),
    )
    return env


@contextlib.contextmanager
def server(config: SoakConfig, world_: World) -> Iterator[Server]:
    """Start the server, wait until the extension answers, stop it afterwards."""
    tokens = {name: secrets.token_hex(16) for name in [ADMIN, *world_.people, world_.bomber]}
    config_path = _write_server_config(config, world_, tokens)
    port = free_port()
    log_path = os.path.join(world_.workdir, "server.log")
    command = [
        config.python,
        "-m",
        "jupyter_server",
        "--allow-root",
        f"--config={config_path}",
        "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0",
        f"--ServerApp.root_dir={world_.root_dir}",
    ]
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            command, stdout=log_file, stderr=subprocess.STDOUT, env=_server_env(world_), cwd=world_.workdir
        )
    made = Server(process, port, tokens, log_path)
    try:
        _wait_until_up(made, timeout=90)
        yield made
    finally:
        stop_server(made)


def _wait_until_up(made: Server, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    request = urllib.request.Request(
        made.base_url + "pipefork/api/status", headers={"Authorization": f"token {made.tokens[ADMIN]}"}
    )
    while time.monotonic() < deadline:
        if made.process.poll() is not None:
            raise SystemExit(f"the server exited with {made.process.returncode}:\n{_log_tail(made)}")
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise SystemExit(f"the server did not answer within {timeout} s:\n{_log_tail(made)}")


def _log_tail(made: Server, lines: int = 30) -> str:
    """The end of the server's log, shown on failure (the work dir is removed afterwards)."""
    with open(made.log_path, errors="replace") as f:
        return "".join(f.readlines()[-lines:])


def stop_server(made: Server) -> None:
    """SIGTERM (the extension stops its fork server), SIGKILL if it does not exit."""
    if made.process.poll() is None:
        made.process.send_signal(signal.SIGTERM)
        try:
            made.process.wait(30)
        except subprocess.TimeoutExpired:
            made.process.kill()
            made.process.wait()


# --- what the kernel shows us: processes, fds, memory, temp files -----------------------------


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    state: str
    uid: int
    cmdline: str


def processes() -> list[Proc]:
    """Every process on the machine, read from /proc (they may vanish while we look)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/status") as f:
                uid = next(int(line.split()[1]) for line in f if line.startswith("Uid:"))
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except (OSError, StopIteration, IndexError):
            continue
        found.append(Proc(int(entry), int(fields[1]), fields[0], uid, cmdline))
    return found


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def fd_targets(pid: int) -> list[str]:
    """What a process's fds point at (socket:[inode], pipe:[inode], paths): to name a leak."""
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            found.append(f"{fd}->{os.readlink(f'/proc/{pid}/fd/{fd}')}")
    return sorted(found, key=lambda item: int(item.split("->")[0]))


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * KiB
    return 0


def forkserver_of(parent: int) -> int | None:
    """The fork server a process started (its child running pipefork_kernel.forkserver)."""
    for proc in processes():
        if proc.ppid == parent and "pipefork_kernel.forkserver" in proc.cmdline and proc.state != "Z":
            return proc.pid
    return None


def files_owned_by(uids: set[int], roots: tuple[str, ...], skip: str) -> list[str]:
    """Paths under ``roots`` owned by one of ``uids`` (the soak's own tree excluded)."""
    found = []
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            if dirpath.startswith(skip):
                dirnames.clear()
                continue
            for name in dirnames + filenames:
                path = os.path.join(dirpath, name)
                try:
                    if os.lstat(path).st_uid in uids:
                        found.append(path)
                except OSError:
                    pass
    return found


def leftovers_in(directory: str, live: set[str]) -> list[str]:
    """Entries of a private temp dir other than the live fork servers' socket dirs."""
    return sorted(p for p in os.listdir(directory) if os.path.join(directory, p) not in live)


def socket_dir_of(forkserver_pid: int | None) -> str | None:
    """The private socket directory named in a fork server's command line."""
    if forkserver_pid is None:
        return None
    try:
        with open(f"/proc/{forkserver_pid}/cmdline", "rb") as f:
            config = json.loads(f.read().split(b"\0")[-2])
    except (OSError, ValueError, IndexError):
        return None
    return os.path.dirname(config["socket_path"])


# --- the mix: what each kind of run sends and how its reply is judged -------------------------


@dataclass
class Reply:
    """How one run ended, in the same shape for REST and engine runs."""

    status: str
    outputs: list[dict[str, Any]] = field(default_factory=list)
    final: dict[str, Any] = field(default_factory=dict)

    def text(self, name: str = "stdout") -> str:
        return "".join(o.get("text", "") for o in self.outputs if o.get("name") == name)

    @property
    def ename(self) -> str | None:
        return (self.final.get("error") or {}).get("ename")


Check = Callable[[Reply], "str | None"]


@dataclass
class Spec:
    """One run to make: code or a function, its timeout, and the check of its reply."""

    code: str | None = None
    function: tuple[Callable[..., Any], tuple] | None = None
    timeout: float = 30.0
    check: Check = lambda reply: None


@dataclass
class Ctx:
    """What a kind's builder may use: a unique token (attribution), the user, randomness."""

    token: str
    user: str
    uid: int
    rng: random.Random
    workdir: str
    max_output_bytes: int
    skip_garbage: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Kind:
    """One kind of run in the mix: how often, which statuses are right, how to make it."""

    name: str
    weight: float
    expected: frozenset[str]
    build: Callable[[Ctx], Spec] | None = None


def stdout_is(expected: str) -> Check:
    """The run printed exactly ``expected``, and nothing from any other run."""

    def check(reply: Reply) -> str | None:
        got = reply.text("stdout")
        return None if got == expected else f"stdout {got[:120]!r}, expected {expected[:120]!r}"

    return check


def kept_last_words(token: str) -> Check:
    """The line a run printed just before it died arrived (and nothing else did).

    Its newline alone may be missing: print() writes the text and the newline
    separately, and the child's output thread may send the text in between; the
    newline, held back as part of a busy spell, dies with the process (cosmetic).
    """

    def check(reply: Reply) -> str | None:
        got = reply.text("stdout")
        if got in (token + "\n", token):
            return None
        return f"last words lost: stdout {got[:120]!r}, expected {token!r}"

    return check


def all_of(*checks: Check) -> Check:
    def check(reply: Reply) -> str | None:
        for one in checks:
            problem = one(reply)
            if problem:
                return problem
        return None

    return check


def final_has(key: str, value: Any) -> Check:
    def check(reply: Reply) -> str | None:
        got = reply.final.get(key)
        return None if got == value else f"{key} is {got!r}, expected {value!r}"

    return check


def ename_is(name: str) -> Check:
    def check(reply: Reply) -> str | None:
        return None if reply.ename == name else f"error {reply.ename!r}, expected {name!r}"

    return check


def build_normal(ctx: Ctx) -> Spec:
    return Spec(code=f"print({ctx.token!r})", check=stdout_is(ctx.token + "\n"))


def build_stream(ctx: Ctx) -> Spec:
    code = f"import time\nfor i in range(5):\n    print({ctx.token!r}, i, flush=True)\n    time.sleep(0.02)"
    return Spec(code=code, check=stdout_is("".join(f"{ctx.token} {i}\n" for i in range(5))))


def build_rich(ctx: Ctx) -> Spec:
    code = (
        "from IPython.display import HTML, Image, display, update_display\n"
        f"display(HTML('<b>{ctx.token}</b>'), display_id='soak')\n"
        f"display(Image(data={PNG_1X1!r}, format='png'))\n"
        f"update_display(HTML('<i>{ctx.token}</i>'), display_id='soak')\n"
        f"{{'token': {ctx.token!r}}}"
    )

    def check(reply: Reply) -> str | None:
        bundles = [o.get("data", {}) for o in reply.outputs]
        if not any(b.get("text/html") == f"<i>{ctx.token}</i>" for b in bundles):
            return f"display update lost: no display shows the updated HTML: {bundles!r:.200}"
        updates = [o for o in reply.outputs if o.get("output_type") == "update_display_data"]
        if any(o.get("transient", {}).get("display_id") != "soak" for o in updates):
            return f"display update lost: an update_display_data without its display_id: {updates!r:.200}"
        if not any(base64.b64decode(b.get("image/png", "")) == PNG_1X1 for b in bundles):
            return "the PNG did not come back intact"
        results = [o for o in reply.outputs if o.get("output_type") == "execute_result"]
        if len(results) != 1 or ctx.token not in results[0]["data"]["text/plain"]:
            return f"execute_result missing or not this run's: {results!r:.200}"
        return None

    return Spec(code=code, check=check)


FUNCTION_SOURCE = """
def soak_function(token, a, b):
    import os
    print(token)
    return {"sum": a + b, "uid": os.getuid()}
"""


def by_value(source: str, name: str) -> Callable[..., Any]:
    """A function dill ships by value (as if typed in a notebook), not as ``soak.<name>``."""
    namespace: dict[str, Any] = {"__name__": "__main__"}
    exec(source, namespace)
    return namespace[name]


def build_function(ctx: Ctx) -> Spec:
    a, b = ctx.rng.randrange(1000), ctx.rng.randrange(1000)
    func = by_value(FUNCTION_SOURCE, "soak_function")
    check = all_of(stdout_is(ctx.token + "\n"), final_has("result", {"sum": a + b, "uid": ctx.uid}))
    return Spec(function=(func, (ctx.token, a, b)), check=check)


def build_long_output(ctx: Ctx) -> Spec:
    line = 120
    lines = 4 * ctx.max_output_bytes // line
    code = (
        f"for i in range({lines}):\n    print(f'{ctx.token} {{i:07d}} ' + 'x' * {line - len(ctx.token) - 10})"
    )

    def check(reply: Reply) -> str | None:
        out, err = reply.text("stdout"), reply.text("stderr")
        if not out.startswith(f"{ctx.token} 0000000 "):
            return f"stdout does not start with this run's first line: {out[:80]!r}"
        if len(out) > ctx.max_output_bytes + 8 * KiB:
            return f"{len(out)} bytes of stdout passed a cap of {ctx.max_output_bytes}"
        if "output limit" not in err:
            return f"no output-limit notice on stderr: {err[:120]!r}"
        return None

    return Spec(code=code, check=check)


def build_timeout_sleep(ctx: Ctx) -> Spec:
    code = f"import time\nprint({ctx.token!r}, flush=True)\ntime.sleep(60)"
    return Spec(code=code, timeout=0.5, check=stdout_is(ctx.token + "\n"))


def build_timeout_busy(ctx: Ctx) -> Spec:
    return Spec(code="while True:\n    pass", timeout=0.5)


def build_timeout_sigterm_ignored(ctx: Ctx) -> Spec:
    code = (
        "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        f"print({ctx.token!r}, flush=True)\ntime.sleep(60)"
    )
    return Spec(code=code, timeout=0.5, check=all_of(stdout_is(ctx.token + "\n"), final_has("signal", 9)))


def last_words(ctx: Ctx) -> str:
    """Print the token just before dying, right away or after the run has been going a while.

    No flush=True: a line printed just before a crash must still arrive (capture.py).
    """
    pause = ctx.rng.choice([0, 0, 0.1, 0.3])
    return f"import time\ntime.sleep({pause})\nprint({ctx.token!r})\n"


def build_segv(ctx: Ctx) -> Spec:
    code = last_words(ctx) + "import ctypes\nctypes.string_at(0)"
    return Spec(code=code, check=all_of(kept_last_words(ctx.token), final_has("signal", 11)))


def build_os_exit(ctx: Ctx) -> Spec:
    code = last_words(ctx) + "import os\nos._exit(3)"
    return Spec(code=code, check=all_of(kept_last_words(ctx.token), final_has("exit_code", 3)))


def build_sys_exit(ctx: Ctx) -> Spec:
    code = f"print({ctx.token!r})\nimport sys\nsys.exit(2)"
    return Spec(code=code, check=all_of(stdout_is(ctx.token + "\n"), ename_is("SystemExit")))


def build_keyboard_interrupt(ctx: Ctx) -> Spec:
    code = f"print({ctx.token!r})\nraise KeyboardInterrupt"
    return Spec(code=code, check=all_of(stdout_is(ctx.token + "\n"), ename_is("KeyboardInterrupt")))


class _UnpickleMarker:
    """Pickles to ``os.mkdir(path)``: if root ever unpickled a child's bytes, the path exists."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (self.path,))


def marker_path(workdir: str) -> str:
    return os.path.join(workdir, "unpickled-by-root")


def _frame(body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + body


def garbage_variants(workdir: str) -> dict[str, tuple[bytes, str]]:
    """Bytes a hostile child writes to its data socket (fd 3), and what it does next."""
    sleep, leave = "time.sleep(60)", "os._exit(0)"
    return {
        "not_json": (_frame(b"hello"), sleep),
        "huge_length": (b"\xff\xff\xff\xff", sleep),
        "not_an_object": (_frame(b"[1, 2]"), sleep),
        "unknown_type": (_frame(b'{"type": "evil", "text": "x"}'), sleep),
        "bad_stream": (_frame(b'{"type": "stream", "name": "stdin", "text": 1}'), sleep),
        "pickle": (_frame(pickle.dumps(_UnpickleMarker(marker_path(workdir)))), sleep),
        "truncated": (b"\x00\x00\x01\x00{", leave),
        "after_done": (_frame(b'{"type": "done", "status": "ok"}') + _frame(b'{"type": "x"}'), sleep),
    }


def build_garbage(ctx: Ctx) -> Spec:
    variants = garbage_variants(ctx.workdir)
    data, then = variants[ctx.rng.choice(sorted(set(variants) - ctx.skip_garbage))]
    code = f"import os, time\nprint({ctx.token!r})\nos.write(3, {data!r})\n{then}"
    return Spec(code=code, check=ename_is("ProtocolError"))


def build_double_fork(ctx: Ctx) -> Spec:
    """A sleeper escaping with setsid: the fork server's orphan sweep must kill it after the run."""
    code = (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        time.sleep(300)\n"
        "    os._exit(0)\n"
        "os.wait()\n"
        f"print({ctx.token!r})"
    )
    return Spec(code=code, check=stdout_is(ctx.token + "\n"))


def build_fork_bomb(ctx: Ctx) -> Spec:
    """Every copy keeps forking until RLIMIT_NPROC says no, then retries: only the timeout ends it."""
    code = (
        f"import os, time\nprint({ctx.token!r}, flush=True)\n"
        "for _ in range(10**6):\n"
        "    try:\n"
        "        os.fork()\n"
        "    except OSError:\n"
        "        time.sleep(0.01)"
    )
    return Spec(code=code, timeout=1.5, check=stdout_is(ctx.token + "\n"))


def build_memory_bomb(ctx: Ctx) -> Spec:
    """Grows until RLIMIT_AS refuses (MemoryError); touching the pages makes it a real load."""
    code = f"print({ctx.token!r})\nchunks = []\nwhile True:\n    chunks.append(bytearray(32 * 2**20))"
    return Spec(code=code, timeout=30, check=all_of(stdout_is(ctx.token + "\n"), ename_is("MemoryError")))


def build_hang_up(ctx: Ctx) -> Spec:
    """A run that prints, then stays quiet: the client hangs up (or cancels) meanwhile."""
    return Spec(code=f"import time\nprint({ctx.token!r}, flush=True)\ntime.sleep(60)", timeout=90)


def _kinds(*entries: tuple[str, float, str, Callable[[Ctx], Spec] | None]) -> list[Kind]:
    return [
        Kind(name, weight, frozenset(expected.split("|")), build) for name, weight, expected, build in entries
    ]


#: Over REST, from each person's own identity or the admin's.
REST_KINDS = _kinds(
    ("normal", 40, "ok", build_normal),
    ("stream", 8, "ok", build_stream),
    ("rich_display", 6, "ok", build_rich),
    ("function", 5, "ok", build_function),
    ("long_output", 3, "ok", build_long_output),
    ("timeout_sleep", 3, "timeout", build_timeout_sleep),
    ("timeout_busy", 1, "timeout", build_timeout_busy),
    ("timeout_sigterm_ignored", 1, "timeout", build_timeout_sigterm_ignored),
    ("segv", 2, "crashed", build_segv),
    ("os_exit_3", 2, "crashed", build_os_exit),
    ("sys_exit", 2, "error", build_sys_exit),
    ("keyboard_interrupt", 1, "error", build_keyboard_interrupt),
    ("garbage_frames", 3, "error", build_garbage),
    ("double_fork_sleeper", 2, "ok", build_double_fork),
    ("disconnect_mid_run", 2, "disconnected", build_hang_up),
    ("disconnect_at_once", 1, "disconnected", build_hang_up),
    ("other_users_notebook", 2, "http_403", None),
    ("status", 2, "http_200", None),
)
#: Through an Engine in this process, as root (as a script or the admin's kernel would).
ENGINE_KINDS = _kinds(
    ("normal", 40, "ok", build_normal),
    ("stream", 6, "ok", build_stream),
    ("rich_display", 3, "ok", build_rich),
    ("function", 6, "ok", build_function),
    ("long_output", 1, "ok", build_long_output),
    ("timeout_sleep", 2, "timeout", build_timeout_sleep),
    ("segv", 2, "crashed", build_segv),
    ("os_exit_3", 1, "crashed", build_os_exit),
    ("garbage_frames", 2, "error", build_garbage),
    ("double_fork_sleeper", 1, "ok", build_double_fork),
    ("cancel_mid_run", 2, "cancelled", build_hang_up),
)
#: One worker, its own user (RLIMIT_NPROC counts per user): bombs, and a run right after.
BOMBER_KINDS = _kinds(
    ("fork_bomb", 4, "timeout", build_fork_bomb),
    ("memory_bomb", 3, "error", build_memory_bomb),
    ("normal_after_bomb", 3, "ok", build_normal),
)


# --- the two ways in: REST and the engine ----------------------------------------------------


def dill_payload(function: tuple[Callable[..., Any], tuple]) -> str:
    func, args = function
    return base64.b64encode(dill.dumps((func, args, {}), recurse=True)).decode()


class RestClient:
    """Talks to the soak server as any of its identities; every request has a deadline."""

    def __init__(self, server_: Server, concurrency: int):
        """max_clients above the workers: a request never queues inside the client, only at the server."""
        self.server = server_
        self.http = SimpleAsyncHTTPClient(force_instance=True, max_clients=concurrency + 8)

    def headers(self, identity: str) -> dict[str, str]:
        return {"Authorization": f"token {self.server.tokens[identity]}"}

    async def post_run(
        self,
        identity: str,
        body: dict[str, Any],
        timeout: float,
        on_chunk: Callable[[bytes], None] | None = None,
    ) -> Reply:
        chunks: list[bytes] = []

        def received(chunk: bytes) -> None:
            chunks.append(chunk)
            if on_chunk is not None:
                on_chunk(chunk)

        request = HTTPRequest(
            self.server.base_url + "pipefork/api/runs",
            method="POST",
            body=json.dumps(body),
            headers=self.headers(identity),
            connect_timeout=10,
            request_timeout=timeout,
            streaming_callback=received,
        )
        response = await self.http.fetch(request, raise_error=False)
        return ndjson_reply(response, b"".join(chunks))

    async def get_json(self, identity: str, path: str, timeout: float = 30) -> tuple[int, Any]:
        request = HTTPRequest(
            self.server.base_url + path, headers=self.headers(identity), request_timeout=timeout
        )
        response = await self.http.fetch(request, raise_error=False)
        if response.code != 200:
            return response.code, None
        return 200, json.loads(response.body)

    async def status(self, attempts: int = 10) -> dict[str, Any]:
        """The server's status; a failed answer is retried (the fork server may be restarting)."""
        code = 0
        for _ in range(attempts):
            code, body = await self.get_json(ADMIN, "pipefork/api/status")
            if code == 200:
                return body
            await asyncio.sleep(0.5)
        raise RuntimeError(f"GET status answered {code} {attempts} times in a row")

    async def hang_up(self, identity: str, body: dict[str, Any], marker: str | None) -> Reply:
        """Send a run over a raw socket and close it: after ``marker`` arrives, or at once."""
        payload = json.dumps(body).encode()
        head = (
            f"POST /pipefork/api/runs HTTP/1.1\r\nHost: 127.0.0.1:{self.server.port}\r\n"
            f"Authorization: token {self.server.tokens[identity]}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
        )
        reader, writer = await asyncio.open_connection("127.0.0.1", self.server.port)
        try:
            writer.write(head.encode() + payload)
            await writer.drain()
            seen = b""
            while marker is not None and marker.encode() not in seen:
                chunk = await reader.read(65536)
                if not chunk:
                    return Reply(f"closed_before_output:{seen[:12].decode(errors='replace')}")
                seen += chunk
                if seen.startswith(b"HTTP/1.1 ") and not seen.startswith(b"HTTP/1.1 200"):
                    return Reply(
                        f"http_{seen[9:12].decode(errors='replace')}",
                        final={"body": seen[-300:].decode(errors="replace")},
                    )
                final = seen.rfind(b'{"final": true')
                if final >= 0 and b"\n" in seen[final:]:
                    return final_of_raw_response(seen)  # it ended before printing the marker
            return Reply("disconnected")
        finally:
            writer.close()

    def close(self) -> None:
        self.http.close()


def final_of_raw_response(raw: bytes) -> Reply:
    """The final NDJSON line of a raw response: one chunk, or the whole body if nothing came before."""
    start = raw.rindex(b'{"final": true')
    try:
        final = json.loads(raw[start : raw.index(b"\n", start)])
    except ValueError:
        return Reply("bad_ndjson", final={"body": raw[-300:].decode(errors="replace")})
    return Reply(final["status"], final=final)


def ndjson_reply(response: HTTPResponse, body: bytes) -> Reply:
    """A streamed run's reply: outputs, then one final line with the status."""
    if response.code == 599:
        error = str(response.error)
        return Reply("client_timeout" if "Timeout" in error else f"transport_error:{error[:60]}")
    if response.code != 200:
        return Reply(f"http_{response.code}", final={"body": body[:300].decode(errors="replace")})
    try:
        items = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
    except ValueError:
        return Reply("bad_ndjson")
    if not items or items[-1].get("final") is not True:
        return Reply("no_final_line", items)
    return Reply(items[-1]["status"], items[:-1], items[-1])


class EngineThread:
    """The harness's Engine, on an event loop of its own in a thread.

    The REST client must not share a loop with the engine: a bug of the engine's
    there (bug I in tests/test_soak.py: a cancelled run leaves a stale watch on its
    fd) breaks the harness's own connections, and the server would get the blame.
    """

    def __init__(self, engine: Any):
        self.engine = engine
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="soak-engine", daemon=True)
        self.thread.start()

    async def call(self, coroutine: Any) -> Any:
        """Await ``coroutine`` on the engine's loop; cancelling this cancels it there too."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coroutine, self.loop))

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


async def engine_run(runner: EngineThread, user: str, spec: Spec) -> Reply:
    """One run through the in-process engine; an exception is an observed status too."""
    outputs: list[dict[str, Any]] = []
    engine = runner.engine
    try:
        if spec.function is not None:
            func, args = spec.function
            value = await runner.call(
                engine.arun_as(user, func, args, timeout=spec.timeout, on_output=outputs.append)
            )
            return Reply("ok", outputs, {"result": value})
        result = await runner.call(engine.arun_cell_as(user, spec.code, timeout=spec.timeout))
    except Exception as exc:  # noqa: BLE001 - what the caller would see is the observation
        return Reply(f"engine:{type(exc).__name__}", outputs, {"error": {"ename": type(exc).__name__}})
    return Reply(result.status, result.outputs, result.to_json())


async def engine_cancel(runner: EngineThread, user: str, spec: Spec, timeout: float) -> Reply:
    """Start a run, cancel it once it has printed (an interrupted caller): it must end."""
    first = asyncio.Event()
    here = asyncio.get_running_loop()
    run = runner.engine.arun_cell_as(
        user, spec.code, timeout=spec.timeout, on_output=lambda _: here.call_soon_threadsafe(first.set)
    )
    task = asyncio.ensure_future(runner.call(run))
    waiter = asyncio.ensure_future(first.wait())
    await asyncio.wait({task, waiter}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    if task.done():
        return Reply(f"ended_before_cancel:{task.result().status if not task.exception() else 'raised'}")
    task.cancel()
    try:
        result = await task
    except asyncio.CancelledError:
        return Reply("cancelled")
    return Reply(f"finished_despite_cancel:{result.status}")


# --- the soak ------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """One finished run, judged."""

    key: str
    status: str
    raw: str
    expected: frozenset[str]
    started: float
    ended: float
    phase: str
    problem: str | None = None
    ename: str | None = None

    @property
    def latency(self) -> float:
        return self.ended - self.started


@dataclass
class Snapshot:
    """Leak-relevant counts at a quiet moment."""

    server_fds: int
    server_rss: int
    forkserver_pid: int | None
    forkserver_fds: int | None
    engine_forkserver_fds: int | None
    harness_fds: int
    fds: dict[str, list[str]]
    zombies: list[Proc]
    user_processes: list[Proc]


@dataclass
class Worker:
    """One of the ``--concurrency`` loops: its way in, its user, its mix, its own randomness."""

    channel: str
    user: str
    kinds: list[Kind]
    rng: random.Random


def where(exc: BaseException) -> dict[str, Any]:
    """An exception and the last frames it came through, for the problem list."""
    frames = traceback.extract_tb(exc.__traceback__)[-4:]
    return {
        "error": repr(exc),
        "at": [f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno} {f.name}" for f in frames],
    }


def summary(final: dict[str, Any]) -> str:
    """The telling fields of a final line first (a long evalue would hide them)."""
    error = final.get("error") if isinstance(final.get("error"), dict) else {}
    fields = {
        k: final[k] for k in ("exit_code", "signal", "duration", "body", "at") if final.get(k) is not None
    }
    if isinstance(fields.get("duration"), float):
        fields["duration"] = round(fields["duration"], 3)
    text = f"{error.get('ename', '')} {json.dumps(fields)} {error.get('evalue', final.get('error', ''))}"
    return text.strip()[:400]


def judge(kind: Kind, spec: Spec, reply: Reply) -> str | None:
    """Why this reply is wrong for its kind, or None.  (The fork-server kill's victims are
    excused later, by time: see under_kill.)"""
    if reply.status not in kind.expected:
        return f"{reply.status}: {summary(reply.final)}"
    try:
        return spec.check(reply)
    except Exception as exc:  # noqa: BLE001 - output the check did not foresee is wrong output
        return f"the check raised {exc!r} on {reply.outputs!r:.200}"


class Soak:
    """Drives one soak against a running server and an engine; collects outcomes."""

    def __init__(self, config: SoakConfig, world_: World, server_: Server, engine: Any):
        self.config = config
        self.world = world_
        self.server = server_
        self.engine = engine
        self.engine_thread = EngineThread(engine)
        self.rest = RestClient(server_, config.concurrency)
        self.outcomes: list[Outcome] = []
        self.started_runs = 0
        self.t0 = 0.0
        self.stop = False
        self.kill: dict[str, Any] = {}
        self.samples: list[tuple[float, int, int, int]] = []
        self.serial = 0
        self.hold_bombs = False
        self.bombs_in_flight = 0
        self.elapsed = 0.0

    # --- one run -----------------------------------------------------------------------------

    def ctx(self, user: str, rng: random.Random) -> Ctx:
        """A fresh context; the token is unique per run, so any output in the wrong run shows."""
        self.serial += 1
        token = f"pfsoak-{self.serial}-{rng.getrandbits(32):08x}"
        return Ctx(
            token,
            user,
            self.world.uids[user],
            rng,
            self.world.workdir,
            self.config.max_output_bytes,
            frozenset(self.config.skip_garbage),
        )

    def rest_body(self, spec: Spec, user: str, rng: random.Random) -> tuple[str, dict[str, Any]]:
        """The person themself or the admin; by notebook path or by user name."""
        if spec.code is not None:
            body: dict[str, Any] = {"code": spec.code}
        else:
            assert spec.function is not None
            body = {"function": dill_payload(spec.function)}
        if rng.random() < 0.5:
            body["path"] = self.world.notebook(user)
        else:
            body["user"] = user
        body["timeout"] = spec.timeout
        identity = ADMIN if rng.random() < 0.3 else user
        return identity, body

    async def execute(self, channel: str, kind: Kind, ctx: Ctx, spec: Spec) -> Reply:
        """Make the run the way the channel and kind say; every wait is bounded by ``limit``."""
        limit = spec.timeout + self.config.client_margin
        if channel == "engine":
            if kind.name == "cancel_mid_run":
                return await engine_cancel(self.engine_thread, ctx.user, spec, limit)
            return await engine_run(self.engine_thread, ctx.user, spec)
        if kind.name == "status":
            code, body = await self.rest.get_json(ctx.user, "pipefork/api/status", timeout=limit)
            return Reply(f"http_{code}" if code != 200 or "forkserver" in body else "bad_status_body")
        if kind.name == "other_users_notebook":
            other = ctx.rng.choice([p for p in self.world.people if p != ctx.user] or [self.world.bomber])
            body = {"path": self.world.notebook(other), "code": "print('must not run')"}
            return await self.rest.post_run(ctx.user, body, limit)
        identity, body = self.rest_body(spec, ctx.user, ctx.rng)
        if channel == "bomber":
            identity = ctx.user
        if kind.name.startswith("disconnect"):
            marker = ctx.token if kind.name == "disconnect_mid_run" else None
            return await asyncio.wait_for(self.rest.hang_up(identity, body, marker), limit)
        return await self.rest.post_run(identity, body, limit)

    async def one(self, channel: str, kind: Kind, user: str, rng: random.Random, phase: str) -> Outcome:
        """Make one run of ``kind`` and judge it; whatever happens, an Outcome is recorded."""
        ctx = self.ctx(user, rng)
        spec = kind.build(ctx) if kind.build else Spec()
        started = time.monotonic()
        try:
            # A backstop over the clients' own deadlines: the harness itself never hangs.
            reply = await asyncio.wait_for(
                self.execute(channel, kind, ctx, spec), spec.timeout + 2 * self.config.client_margin
            )
        except TimeoutError:
            reply = Reply("client_timeout")
        except (OSError, asyncio.IncompleteReadError) as exc:
            reply = Reply(f"transport_error:{type(exc).__name__}", final=where(exc))
        except Exception as exc:  # noqa: BLE001 - a harness bug is a failed row, not a lost table
            reply = Reply(f"harness_error:{type(exc).__name__}", final=where(exc))
        outcome = Outcome(
            f"{channel}:{kind.name}",
            reply.status,
            reply.status,
            kind.expected,
            started,
            time.monotonic(),
            phase,
        )
        outcome.ename = reply.ename
        outcome.problem = judge(kind, spec, reply)
        if outcome.problem and reply.status in kind.expected:
            outcome.status = "wrong_output"
        self.outcomes.append(outcome)
        return outcome

    # --- phases ------------------------------------------------------------------------------

    def workers(self) -> list[Worker]:
        """One bomber (its own user), then REST and engine workers spread over the people."""
        k = self.config.concurrency
        engines = max(1, round((k - 1) * self.config.engine_share))
        plan = [("bomber", self.world.bomber, BOMBER_KINDS)]
        plan += [
            ("rest", self.world.people[i % len(self.world.people)], REST_KINDS)
            for i in range(k - 1 - engines)
        ]
        plan += [
            ("engine", self.world.people[i % len(self.world.people)], ENGINE_KINDS) for i in range(engines)
        ]
        return [
            Worker(channel, user, kinds, random.Random(f"{self.config.seed}-{i}"))
            for i, (channel, user, kinds) in enumerate(plan)
        ]

    def may_start(self) -> bool:
        """Whether a worker may start another run (and count it): targets and hard limit."""
        elapsed = time.monotonic() - self.t0
        if self.stop or elapsed >= self.config.hard_limit():
            return False
        if self.config.targets_met(elapsed, self.started_runs):
            return False
        self.started_runs += 1
        return True

    async def work(self, worker: Worker) -> None:
        """Draw kinds until the targets are met; bombs wait while the fork-server kill is set up."""
        weights = [kind.weight for kind in worker.kinds]
        while self.may_start():
            kind = worker.rng.choices(worker.kinds, weights)[0]
            bomb = kind.name.endswith("_bomb")
            if bomb and self.hold_bombs:
                kind, bomb = BOMBER_KINDS[-1], False
            self.bombs_in_flight += bomb
            try:
                await self.one(worker.channel, kind, worker.user, worker.rng, "soak")
            finally:
                self.bombs_in_flight -= bomb

    async def quiet_baseline(self, count: int) -> None:
        """Normal runs one at a time, nothing else going: the latency to compare against."""
        normal = REST_KINDS[0]
        rng = random.Random(self.config.seed)
        for i in range(count):
            user = self.world.people[i % len(self.world.people)]
            await self.one("rest", normal, user, rng, "quiet")
            await self.one("engine", ENGINE_KINDS[0], user, rng, "quiet")

    async def warmup(self) -> None:
        """Every kind once, one at a time, so lazily opened fds and caches exist before 'before'."""
        rng = random.Random(self.config.seed + 1)
        user = self.world.people[0]
        for channel, kinds in (("rest", REST_KINDS), ("engine", ENGINE_KINDS), ("bomber", BOMBER_KINDS)):
            for kind in kinds:
                await self.one(
                    channel, kind, self.world.bomber if channel == "bomber" else user, rng, "warmup"
                )

    async def kill_forkserver_once(self) -> None:
        """At ``kill_at`` of the way, SIGKILL the server's fork server (pid from GET status).

        No fork bomb is going at that moment (its copies would outlive the kill and
        spoil every later check); a run with subprocesses is, and must die with it.
        """
        while not self.stop:
            elapsed = time.monotonic() - self.t0
            if self.config.progress(elapsed, self.started_runs) >= self.config.kill_at:
                break
            await asyncio.sleep(0.05)
        else:
            return
        self.hold_bombs = True
        try:
            while self.bombs_in_flight:
                await asyncio.sleep(0.05)
            up = asyncio.Event()
            pool = self.ctx(self.world.people[0], random.Random(self.config.seed))
            pool_run = asyncio.ensure_future(self.multi_process_run(pool, up))
            waiter = asyncio.ensure_future(up.wait())
            await asyncio.wait({pool_run, waiter}, timeout=60, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            before = await self.rest.status()
            old = before["forkserver"]["pid"]
            os.kill(old, signal.SIGKILL)
            self.kill = {
                "old": old,
                "time": time.monotonic(),
                "active": len(before["runs"]["active"]),
                "restarts_before": before["forkserver"]["restarts"],
            }
            await pool_run
            self.kill["survivors"] = await self.survivors(pool.uid, timeout=5.0)
        finally:
            self.hold_bombs = False
        await asyncio.sleep(1.0)
        after = await self.rest.status()
        self.kill.update(new=after["forkserver"]["pid"], restarts=after["forkserver"]["restarts"])

    async def multi_process_run(self, ctx: Ctx, up: asyncio.Event) -> Outcome:
        """A run with subprocesses (a pool, a shell pipeline) going when the fork server dies."""
        code = (
            "import subprocess, time\n"
            f"procs = [subprocess.Popen(['sleep', '{POOL_SLEEP}']) for _ in range({POOL_SIZE})]\n"
            f"print({ctx.token!r}, flush=True)\ntime.sleep(60)"
        )
        body = {"user": ctx.user, "code": code, "timeout": 90}
        marker = ctx.token.encode()

        def watch(chunk: bytes) -> None:
            if marker in chunk:
                up.set()

        started = time.monotonic()
        reply = await self.rest.post_run(ADMIN, body, 90 + self.config.client_margin, watch)
        outcome = Outcome(
            "rest:multi_process_run_at_kill",
            reply.status,
            reply.status,
            frozenset({"crashed"}),
            started,
            time.monotonic(),
            "soak",
        )
        if reply.status != "crashed":
            outcome.problem = f"{reply.status}: {json.dumps(reply.final)[:300]}"
        self.outcomes.append(outcome)
        return outcome

    async def survivors(self, uid: int, timeout: float) -> int:
        """How many of the run's subprocesses outlived it by ``timeout``; the harness kills them."""
        deadline = time.monotonic() + timeout
        while True:
            left = [p for p in processes() if p.uid == uid and p.cmdline == f"sleep {POOL_SLEEP}"]
            if not left or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.1)
        for proc in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
        return len(left)

    async def sample(self) -> None:
        """The server's RSS and fds every second, for the 'mid' figure and a look at the trend."""
        while not self.stop:
            with contextlib.suppress(OSError):
                self.samples.append(
                    (
                        time.monotonic() - self.t0,
                        len(self.outcomes),
                        rss_bytes(self.server.pid),
                        fd_count(self.server.pid),
                    )
                )
            await asyncio.sleep(1.0)

    async def report_progress(self) -> None:
        """A line on stderr every 10 s, so an operator sees a long soak is alive."""
        while not self.stop:
            await asyncio.sleep(10)
            soak = [o for o in self.outcomes if o.phase == "soak"]
            bad = sum(1 for o in soak if o.problem)
            elapsed = time.monotonic() - self.t0
            log(
                self.config,
                f"{len(soak)} runs in {elapsed:.0f} s ({len(soak) / elapsed:.1f}/s), {bad} unexpected",
            )

    async def soak(self) -> None:
        """All workers at once, with the killer, the sampler and the progress line beside them."""
        self.t0 = time.monotonic()
        helpers = [
            asyncio.ensure_future(f()) for f in (self.kill_forkserver_once, self.sample, self.report_progress)
        ]
        try:
            await asyncio.gather(*(self.work(w) for w in self.workers()))
        finally:
            self.stop = True
            self.elapsed = time.monotonic() - self.t0
            for helper in helpers[1:]:
                helper.cancel()
            await asyncio.gather(helpers[0], return_exceptions=True)

    # --- quiet moments -----------------------------------------------------------------------

    async def settle(self, timeout: float = 20.0) -> None:
        """Wait until no run is going and the test users own no process (orphan sweeps are lazy)."""
        uids = set(self.world.uids.values())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = await self.rest.status()
            busy = status["runs"]["active"] or status["forkserver"].get("active")
            if not busy and not [p for p in processes() if p.uid in uids]:
                break
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.0)  # let the server close the last connections

    def snapshot(self) -> Snapshot:
        """Counts for before/after; fds and RSS are read from /proc, so no request disturbs them."""
        uids = set(self.world.uids.values())
        forkserver = forkserver_of(self.server.pid)
        engine_fs = self.engine.forkserver.pid
        ours = {os.getpid(), self.server.pid, forkserver, engine_fs}
        table = processes()
        return Snapshot(
            server_fds=fd_count(self.server.pid),
            server_rss=rss_bytes(self.server.pid),
            forkserver_pid=forkserver,
            forkserver_fds=fd_count(forkserver) if forkserver else None,
            engine_forkserver_fds=fd_count(engine_fs) if engine_fs else None,
            harness_fds=fd_count(os.getpid()),
            fds={"server": fd_targets(self.server.pid), "harness": fd_targets(os.getpid())},
            zombies=[p for p in table if p.state == "Z" and (p.ppid in ours or p.uid in uids)],
            user_processes=[p for p in table if p.uid in uids],
        )

    async def main(self) -> tuple[Snapshot, Snapshot, dict[str, Any]]:
        """Quiet baseline, warm-up, 'before', the soak, 'after', and a last run of each channel."""
        log(self.config, "warm-up: every kind once")
        await self.warmup()
        await self.settle()
        log(self.config, "quiet baseline: normal runs one at a time")
        await self.quiet_baseline(20)
        await self.settle()
        before = self.snapshot()
        log(self.config, f"soak: {self.config.concurrency} workers")
        await self.soak()
        log(self.config, "settling")
        await self.settle()
        after = self.snapshot()
        final_status = await self.rest.status()
        for channel in ("rest", "engine"):
            await self.one(channel, REST_KINDS[0], self.world.people[0], random.Random(0), "final")
        self.rest.close()
        self.engine_thread.close()
        return before, after, final_status


# --- the table -------------------------------------------------------------------------------------


@dataclass
class Row:
    check: str
    expected: str
    observed: str
    ok: bool


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    #: (subject, what went wrong): every unexpected run, and what leak and log checks found.
    problems: list[tuple[str, str]] = field(default_factory=list)

    def add(self, check: str, expected: str, observed: str, ok: bool) -> None:
        self.rows.append(Row(check, expected, observed, ok))

    @property
    def failed(self) -> list[Row]:
        return [row for row in self.rows if not row.ok]

    def table(self) -> str:
        header = ("check", "expected", "observed", "result")
        cells = [header] + [(r.check, r.expected, r.observed, "PASS" if r.ok else "FAIL") for r in self.rows]
        widths = [max(len(row[i]) for row in cells) for i in range(4)]
        lines = [
            "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in cells
        ]
        lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
        return "\n".join(lines)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile: p99 of 100 values is the 99th smallest, a real observation."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered), max(1, math.ceil(len(ordered) * q))) - 1]


def under_kill(outcome: Outcome, kill: dict[str, Any]) -> bool:
    """A REST run going when the fork server was SIGKILLed may end crashed or 500.

    So may one that started within KILL_WINDOW after: until the server notices the
    death, a request can still reach the dying fork server's socket.
    """
    when = kill.get("time")
    if when is None or outcome.key.startswith("engine:"):
        return False
    # A crash kind also ends "crashed" under the kill, but as ForkServerLost, not its own crash.
    excused = outcome.raw in KILLED_UNDER_IT - outcome.expected or outcome.ename == "ForkServerLost"
    return outcome.started <= when + KILL_WINDOW and outcome.ended >= when and excused


def run_rows(report: Report, outcomes: list[Outcome], kill: dict[str, Any]) -> None:
    """Runs by kind: expected status, observed statuses, pass if every run ended as it should."""
    by_key: dict[str, list[Outcome]] = {}
    for outcome in outcomes:
        by_key.setdefault(outcome.key, []).append(outcome)
    for key, group in by_key.items():
        counts: dict[str, int] = {}
        for o in group:
            label = o.status + ("†" if under_kill(o, kill) else "")
            counts[label] = counts.get(label, 0) + 1
        bad = [o for o in group if o.problem and not under_kill(o, kill)]
        observed = ", ".join(f"{s} {n}" for s, n in sorted(counts.items(), key=lambda kv: -kv[1]))
        expected = "|".join(sorted(group[0].expected))
        report.add(f"runs {key} (n={len(group)})", expected, observed, not bad)
        report.problems += [(key, o.problem or "") for o in bad]


def latency_rows(report: Report, outcomes: list[Outcome], max_p99: float) -> None:
    """Normal runs alone (the reference) and beside the faults (the check): faults must not starve others."""
    for channel in ("rest", "engine"):
        for phase, label in (("quiet", "alone"), ("soak", "beside the faults")):
            times = [o.latency for o in outcomes if o.key == f"{channel}:normal" and o.phase == phase]
            if not times:
                continue
            p50, p99 = percentile(times, 0.50), percentile(times, 0.99)
            observed = f"p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, max {max(times) * 1000:.0f} ms"
            check = f"latency {channel}:normal {label} (n={len(times)})"
            if phase == "quiet":
                report.add(check, "(reference)", observed, True)
            else:
                report.add(check, f"p99 <= {max_p99:g} s", observed, p99 <= max_p99)


def volume_row(report: Report, config: SoakConfig, outcomes: list[Outcome], elapsed: float) -> None:
    """How many runs in how long: a soak that did not reach its targets proves less."""
    soak = [o for o in outcomes if o.phase == "soak"]
    wanted = []
    if config.runs:
        wanted.append(f">= {config.runs} runs")
    if config.duration:
        wanted.append(f">= {config.duration:g} s")
    met = config.targets_met(elapsed, len(soak))
    rate = len(soak) / max(elapsed, 1e-9)
    observed = f"{len(soak)} runs in {elapsed:.0f} s ({rate:.1f}/s), {len(outcomes)} in all"
    report.add(f"volume ({config.concurrency} concurrent)", " and ".join(wanted) or "-", observed, met)


def kill_row(report: Report, kill: dict[str, Any], outcomes: list[Outcome]) -> None:
    """The fork server came back once (a crash besides the kill would show as restarts > 1)."""
    if not kill:
        report.add("fork server SIGKILL mid-soak", "killed once, restarted", "never killed", False)
        return
    hit = sum(1 for o in outcomes if under_kill(o, kill))
    once = (kill.get("restarts") or 0) - kill["restarts_before"]
    restarted = kill.get("new") not in (None, kill["old"]) and once == 1
    observed = (
        f"pid {kill['old']} -> {kill.get('new')}, restarted {once}x, "
        f"{kill['active']} REST runs going, {hit} ended crashed/500 (†)"
    )
    report.add("fork server SIGKILL mid-soak", "new pid on next request, once", observed, restarted)
    survivors = kill.get("survivors")
    report.add(
        "fork server SIGKILL: subprocesses of a run it had forked",
        "gone within 5 s",
        f"{survivors} of {POOL_SIZE} still running after 5 s"
        + (" (killed by the harness)" if survivors else ""),
        survivors == 0,
    )


def crash_row(report: Report, status: dict[str, Any], kill: dict[str, Any], engine: Any) -> None:
    """Fork servers that died by themselves: every run they had going died with them."""
    server = status["forkserver"]["restarts"] - (1 if kill else 0)
    own = engine.forkserver.restarts
    report.add(
        "fork server crashes (restarts besides the kill)",
        "server 0, engine 0",
        f"server {server}, engine {own}",
        not (server or own),
    )
    if own:
        report.problems.append(
            ("engine fork server", f"died {own} times by itself; its traceback is on stderr")
        )


def leak_rows(report: Report, before: Snapshot, after: Snapshot, config: SoakConfig, samples: list) -> None:
    """Zombies, processes, fds and RSS: after the soak, at rest, nothing more than before it."""
    report.add(
        "zombies (of server, fork servers, harness, test users)",
        "0",
        f"before {len(before.zombies)}, after {len(after.zombies)}",
        not after.zombies,
    )
    report.add(
        "processes left by test users",
        "0",
        f"{len(after.user_processes)} "
        + " ".join(f"{p.pid}:{p.cmdline[:40]}" for p in after.user_processes[:3]),
        not after.user_processes,
    )
    fd_pairs = (
        ("open fds: server", before.server_fds, after.server_fds),
        (
            "open fds: server's fork server (idle, new one after the kill)",
            before.forkserver_fds,
            after.forkserver_fds,
        ),
        ("open fds: engine's fork server (idle)", before.engine_forkserver_fds, after.engine_forkserver_fds),
        ("open fds: harness (the engine's caller)", before.harness_fds, after.harness_fds),
    )
    for check, was, now in fd_pairs:
        ok = was is not None and now is not None and now <= was
        report.add(check, "after <= before", f"before {was}, after {now}", ok)
    for name, targets in after.fds.items():
        new = sorted(set(targets) - set(before.fds[name]))
        if len(targets) > len(before.fds[name]):
            report.problems.append((f"fds of the {name}", f"opened during the soak and still open: {new}"))
    growth = (after.server_rss - before.server_rss) / MiB
    mid = [s[2] for s in samples if s[0] >= samples[-1][0] / 2] if samples else []
    observed = (
        f"before {before.server_rss / MiB:.0f} MiB, mid {mid[0] / MiB if mid else 0:.0f} MiB, "
        f"after {after.server_rss / MiB:.0f} MiB ({growth:+.1f})"
    )
    report.add(
        "RSS: server",
        f"growth <= {config.max_rss_growth_mib:g} MiB",
        observed,
        growth <= config.max_rss_growth_mib,
    )


def accounting_row(report: Report, outcomes: list[Outcome], status: dict[str, Any]) -> None:
    """The server's own count of runs by status equals what the clients saw."""
    server_counts = status["runs"]["by_status"]
    seen: dict[str, int] = {}
    for o in outcomes:
        if o.key.startswith("engine:") or o.phase == "final":
            continue
        raw = "cancelled" if o.raw == "disconnected" else o.raw
        if raw in ("ok", "error", "timeout", "crashed", "cancelled"):
            seen[raw] = seen.get(raw, 0) + 1
    keys = sorted(set(seen) | set(server_counts))
    ok = all(seen.get(k, 0) == server_counts.get(k, 0) for k in keys)
    observed = ", ".join(f"{k} {server_counts.get(k, 0)}/{seen.get(k, 0)}" for k in keys)
    report.add("server's runs by status / clients' view", "equal", observed, ok)
    active = status["runs"]["active"], status["forkserver"].get("active")
    report.add("runs still active after the soak", "none", repr(active)[:60], not any(active))


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def tracebacks_in(lines: list[str]) -> list[str]:
    """Each traceback in a log as "where: the exception line" (where: the request, if any)."""
    found = []
    for i, line in enumerate(lines):
        if "Traceback (most recent call last)" not in line:
            continue
        before = [x for x in lines[max(0, i - 3) : i] if "Uncaught exception" in x]
        where = before[-1].split("] ", 1)[-1] if before else "a process without a request"
        end = i + 1
        while end < len(lines) and _indent(lines[end]) > _indent(line):
            end += 1
        found.append(f"{where}: {lines[end].strip() if end < len(lines) else '?'}")
    return found


def log_row(report: Report, log_path: str, outcomes: list[Outcome]) -> None:
    """Tracebacks in the server's log are bugs; 500s are logged only for runs the kill hit."""
    with open(log_path, errors="replace") as f:
        lines = f.read().splitlines()
    tracebacks = tracebacks_in(lines)
    unretrieved = sum("exception was never retrieved" in line for line in lines)
    errors = [line for line in lines if line.startswith("[E ")]
    logged_500 = [line for line in errors if "] 500 " in line]
    # Not counted again: the 500s, their header dumps, the traceback lines' own headers.
    other = [
        line
        for line in errors
        if "] 500 " not in line and not line.endswith("] {") and "Uncaught exception" not in line
    ]
    seen_500 = sum(1 for o in outcomes if o.raw == "http_500")
    report.add(
        "server log: tracebacks, unretrieved futures, other errors; 500s",
        f"0, 0, 0; {seen_500} (the clients' 500s)",
        f"{len(tracebacks)}, {unretrieved}, {len(other)}; {len(logged_500)}",
        not (tracebacks or unretrieved or other) and len(logged_500) == seen_500,
    )
    report.problems += [("server log", f"traceback in {where}"[:300]) for where in tracebacks]
    report.problems += [("server log", line[:200]) for line in other[:5]]


def temp_rows(report: Report, world_: World, live: set[str], label: str) -> None:
    """Socket dirs of dead fork servers, and files the test users left in shared temp dirs."""
    leftovers = leftovers_in(world_.server_tmp, live) + leftovers_in(world_.engine_tmp, live)
    report.add(
        f"temp: pipefork-* dirs left in the private TMPDIRs ({label})",
        "none",
        repr(leftovers)[:60],
        not leftovers,
    )
    owned = sorted(
        set(files_owned_by(set(world_.uids.values()), SHARED_TMP_DIRS, world_.workdir)) - world_.stale_files
    )
    report.add(
        f"temp: files of test users in /tmp /var/tmp /dev/shm ({label})", "none", repr(owned)[:60], not owned
    )


def gone(pid: int | None, timeout: float = 10.0) -> bool:
    """Whether ``pid`` exited (or is a zombie awaiting its parent) within ``timeout``."""
    deadline = time.monotonic() + timeout
    while pid is not None and time.monotonic() < deadline:
        if not os.path.exists(f"/proc/{pid}") or processes_state(pid) == "Z":
            return True
        time.sleep(0.1)
    return pid is None


def processes_state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def shutdown_rows(report: Report, server_: Server, engine: Any, world_: World, forkservers: list) -> None:
    """Stop the server (SIGTERM) and the engine: their fork servers and temp dirs must go too."""
    stop_server(server_)
    engine.close()
    still = [pid for pid in forkservers if not gone(pid)]
    report.add(
        "after shutdown: fork servers exited",
        "all",
        f"{len(forkservers) - len(still)}/{len(forkservers)}",
        not still,
    )
    report.add(
        "after shutdown: server exit status",
        "0",
        str(server_.process.returncode),
        server_.process.returncode == 0,
    )
    temp_rows(report, world_, set(), "after shutdown")
    uids = set(world_.uids.values())
    time.sleep(0.5)
    left = [p for p in processes() if p.uid in uids]
    report.add("after shutdown: processes of test users", "0", str(len(left)), not left)


# --- putting it together -----------------------------------------------------------------------------


def make_engine(config: SoakConfig, world_: World) -> Any:
    """The harness's own engine, with the server's limits and a private runtime dir."""
    from pipefork_kernel import Engine

    settings = Config()
    for trait, value in limits_config(config).items():
        settings.RunLimits[trait] = value
    settings.ForkServer.runtime_dir = world_.engine_tmp
    settings.ForkServer.max_runs_per_user = config.concurrency + 4
    return Engine(config=settings)


def run(config: SoakConfig) -> Report:
    """One whole soak: world, server, engine, the run, the checks; everything removed after."""
    if os.geteuid() != 0:
        raise SystemExit("run the soak as root: it creates users and starts a root server")
    if config.concurrency < 3:
        raise SystemExit("--concurrency must be at least 3 (a bomber, a REST worker, an engine worker)")
    report = Report()
    with world(config) as world_, server(config, world_) as server_:
        engine = make_engine(config, world_)
        try:
            soak = Soak(config, world_, server_, engine)
            before, after, status = asyncio.run(soak.main())
            live = {d for d in (socket_dir_of(after.forkserver_pid), engine.forkserver.socket_dir) if d}
            volume_row(report, config, soak.outcomes, soak.elapsed)
            run_rows(report, soak.outcomes, soak.kill)
            kill_row(report, soak.kill, soak.outcomes)
            crash_row(report, status, soak.kill, engine)
            latency_rows(report, soak.outcomes, config.max_p99)
            leak_rows(report, before, after, config, soak.samples)
            temp_rows(report, world_, live, "after the soak")
            accounting_row(report, soak.outcomes, status)
            report.add(
                "root never unpickled a child's bytes",
                "no marker",
                "absent",
                not os.path.exists(marker_path(world_.workdir)),
            )
            forkservers = [after.forkserver_pid, engine.forkserver.pid]
            shutdown_rows(report, server_, engine, world_, forkservers)
            log_row(report, server_.log_path, soak.outcomes)
        finally:
            engine.close()
    return report


def parse_args(argv: list[str] | None = None) -> SoakConfig:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, help="seconds to soak for")
    parser.add_argument("--runs", type=int, help="runs to make (with --duration: both must be reached)")
    parser.add_argument("--concurrency", type=int, default=16, help="runs in flight at once (default 16)")
    parser.add_argument("--engine-share", type=float, default=0.25, help="share of workers using the engine")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--user-prefix", default="pfsoak_", help="throwaway users are PREFIXa, PREFIXb, PREFIXbomb"
    )
    parser.add_argument("--users", type=int, default=3, help="people (besides the bomber), default 3")
    parser.add_argument(
        "--recreate-users", action="store_true", help="replace leftover users of a killed soak"
    )
    parser.add_argument("--kill-at", type=float, default=0.4, help="when to SIGKILL the fork server (0..1)")
    parser.add_argument(
        "--skip-garbage",
        action="append",
        default=[],
        metavar="VARIANT",
        help=f"leave out a garbage-frame variant ({', '.join(sorted(garbage_variants('/')))})",
    )
    parser.add_argument("--max-output-bytes", type=int, default=256 * KiB, help="RunLimits.max_output_bytes")
    parser.add_argument("--rlimit-nproc", type=int, default=128, help="RunLimits.rlimit_nproc")
    parser.add_argument("--rlimit-as", type=int, default=768 * MiB, help="RunLimits.rlimit_as (bytes)")
    parser.add_argument("--max-p99", type=float, default=5.0, help="seconds a normal run's p99 may reach")
    parser.add_argument("--max-rss-growth-mib", type=float, default=48.0, help="server RSS growth allowed")
    parser.add_argument(
        "--max-seconds", type=float, help="hard stop for starting runs (default 2*duration+600)"
    )
    parser.add_argument(
        "--keep-workdir", action="store_true", help="keep the server log and config afterwards"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    args = parser.parse_args(argv)
    if args.duration is None and args.runs is None:
        parser.error("give --duration SECONDS and/or --runs N")
    return SoakConfig(
        duration=args.duration,
        runs=args.runs,
        concurrency=args.concurrency,
        engine_share=args.engine_share,
        seed=args.seed,
        user_prefix=args.user_prefix,
        users=args.users,
        recreate_users=args.recreate_users,
        kill_at=args.kill_at,
        skip_garbage=tuple(args.skip_garbage),
        max_output_bytes=args.max_output_bytes,
        rlimit_nproc=args.rlimit_nproc,
        rlimit_as=args.rlimit_as,
        max_p99=args.max_p99,
        max_rss_growth_mib=args.max_rss_growth_mib,
        max_seconds=args.max_seconds,
        keep_workdir=args.keep_workdir,
        verbose=not args.quiet,
    )


def main(argv: list[str] | None = None) -> int:
    """The command line: one table on stdout, problems on stderr, exit 1 if a check failed."""
    config = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the server stops and the throwaway users are removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    report = run(config)
    print(report.table())
    # The first problem of each sort (kind and status), with how many there were.
    sorts: dict[tuple[str, str], list[str]] = {}
    for subject, problem in report.problems:
        sorts.setdefault((subject, problem.split(":")[0]), []).append(problem)
    for (subject, _), problems in sorts.items():
        print(f"  problem: {subject} (x{len(problems)}): {problems[0]}", file=sys.stderr)
    failed = report.failed
    print(
        f"\n{'FAIL' if failed else 'PASS'}: {len(report.rows) - len(failed)}/{len(report.rows)} checks passed"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
