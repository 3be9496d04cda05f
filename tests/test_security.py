"""One test per threat in SECURITY.md that the engine itself must prove.

Each test sets up the attack for real (extra groups on the parent, open
secrets, a controlling tty, a session key, a setuid binary, hostile frames)
and fails if the mitigation it covers were removed.  Setups that could be
vacuous on an unusual machine are checked first ("setup: ...") or skip with
the reason.  Functions sent with ``run_as`` are nested on purpose: dill
pickles them by value, and the test module is not importable by the users.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import grp
import json
import os
import pickle
import pty
import pwd
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

from pipefork_kernel import PolicyError
from pipefork_kernel.protocol import HEADER

GiB = 1024**3
#: How long a process the run left behind may take to disappear.
LEFTOVER_GRACE = 3.0


# --- helpers ----------------------------------------------------------------------------


def stream_text(outputs: list[dict], name: str = "stdout") -> str:
    return "".join(o["text"] for o in outputs if o["output_type"] == "stream" and o["name"] == name)


def texts(result, name: str = "stdout") -> str:
    return stream_text(result.outputs, name)


def errno_name(number: int) -> str:
    return errno.errorcode.get(number, str(number)) if number else "success"


def proc_status(pid: int | str) -> dict[str, str]:
    """The ``Key: value`` lines of /proc/<pid>/status."""
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def proc_ids(text: str) -> list[int]:
    return [int(x) for x in text.split()]


def fd_links(pid: int) -> dict[str, str]:
    """What each open fd of ``pid`` refers to, e.g. ``{"3": "socket:[1234]"}``."""
    links = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            links[fd] = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            pass  # closed meanwhile
    return links


def processes_of(uid: int) -> list[int]:
    """Live (non-zombie) processes whose real uid is ``uid``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            status = proc_status(entry)
        except OSError:
            continue
        if proc_ids(status["Uid"])[0] == uid and not status["State"].startswith("Z"):
            found.append(int(entry))
    return found


def wait_until_no_processes(uid: int, timeout: float = LEFTOVER_GRACE) -> list[int]:
    """Poll until ``uid`` owns no process; return what is still there at the deadline."""
    deadline = time.monotonic() + timeout
    while (left := processes_of(uid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def pgrep(user: str) -> list[str]:
    return subprocess.run(["pgrep", "-u", user], capture_output=True, text=True).stdout.split()


def run_as_plain_setuid(user: str, argv: list[str]) -> subprocess.CompletedProcess:
    """Run ``argv`` as ``user`` the naive way (setuid, no other step of the drop).

    A control: it shows what the attack achieves without pipefork's mitigation,
    so a test whose control fails would prove nothing.
    """
    entry = pwd.getpwnam(user)
    return subprocess.run(
        argv,
        user=entry.pw_uid,
        group=entry.pw_gid,
        extra_groups=[],
        capture_output=True,
        text=True,
        cwd="/",
        timeout=60,
    )


def file_contains(path: str, needle: bytes) -> bool:
    """Search a possibly huge file in chunks, without missing a match across two chunks."""
    tail = b""
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            if needle in tail + chunk:
                return True
            tail = chunk[-(len(needle) - 1) :]
    return False


# --- T1 incomplete drop -----------------------------------------------------------------


def test_t1_drop_is_complete_even_with_extra_groups_in_the_parent(make_engine, users):
    """setgid() keeps root's supplementary groups: the parent's 0 and 42 must not reach the child."""
    saved = os.getgroups()
    os.setgroups([0, 42])
    try:
        eng = make_engine()
        eng.forkserver.start()
    finally:
        os.setgroups(saved)
    held = proc_ids(proc_status(eng.forkserver.pid)["Groups"])
    assert {0, 42} <= set(held), f"setup: the fork server should hold groups 0 and 42, has {held}"

    def probe():
        import os

        def errno_of(action):
            try:
                action()
            except OSError as exc:
                return exc.errno
            return 0

        with open("/proc/self/status") as f:
            fields = dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
        return {
            "status": {key: fields[key] for key in ("Uid", "Gid", "Groups", "CapEff", "CapPrm")},
            "setuid0": errno_of(lambda: os.setuid(0)),
            "setgid0": errno_of(lambda: os.setgid(0)),
            "shadow": errno_of(lambda: open("/etc/shadow").close()),
        }

    extra_gid = grp.getgrnam(users.extra_group).gr_gid
    for name in (users.student1, users.grouped):
        entry = pwd.getpwnam(name)
        got = eng.run_as(name, probe)
        status = got["status"]
        assert proc_ids(status["Uid"]) == [entry.pw_uid] * 4, f"{name}: Uid line is {status['Uid']!r}"
        assert proc_ids(status["Gid"]) == [entry.pw_gid] * 4, f"{name}: Gid line is {status['Gid']!r}"
        groups = sorted(proc_ids(status["Groups"]))
        assert groups == sorted(set(os.getgrouplist(name, entry.pw_gid))), (
            f"{name}: child groups {groups} are not the user's own (parent held 0 and 42)"
        )
        assert int(status["CapEff"], 16) == 0 and int(status["CapPrm"], 16) == 0, (
            f"{name}: capabilities left: CapEff={status['CapEff']} CapPrm={status['CapPrm']}"
        )
        for key in ("setuid0", "setgid0"):
            assert got[key] == errno.EPERM, f"{name}: {key} gave {errno_name(got[key])}, not EPERM"
        assert got["shadow"] == errno.EACCES, f"{name}: open('/etc/shadow') gave {errno_name(got['shadow'])}"
        if name == users.grouped:
            assert extra_gid in groups, f"{name} lost its own extra group {users.extra_group}"


# --- T2 spoofed user specs --------------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    ["root", "0", "-1", "4294967295", "", "pfsec_no_such_user", "daemon", "nobody"],
)
def test_t2_spoofed_and_system_user_specs_are_refused_before_any_fork(make_engine, spec):
    """Spoofed, privileged and system user specs are refused in the caller, before any fork.

    "-1" and "4294967295" mean "no change" to setresuid (sudo's CVE-2019-14287);
    a fresh engine that refuses must not even have started its fork server.
    """
    eng = make_engine()
    with pytest.raises(PolicyError):
        eng.run_cell_as(spec, "import os\nos.getuid()")
    assert not eng.forkserver.running(), f"a fork server was started for the refused user spec {spec!r}"


# --- T4 inherited file descriptors ------------------------------------------------------


def test_t4_child_holds_only_the_fds_it_needs(make_engine, users):
    """The parent's /etc/shadow and socket, and the fork server's own fds, stay out of the child.

    Pipes and sockets are told apart by inode, so the child's own pipes are fine
    but one it shares with the fork server (listener, lifeline, wake-up pipe) is not.
    """
    shadow = os.open("/etc/shadow", os.O_RDONLY)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        os.set_inheritable(shadow, True)
        sock.set_inheritable(True)
        eng = make_engine()
        eng.forkserver.start()

        def open_fds():
            import os

            links = {}
            for fd in os.listdir("/proc/self/fd"):
                try:
                    links[fd] = os.readlink(f"/proc/self/fd/{fd}")
                except OSError:
                    pass  # the directory's own fd, closed by now
            return links

        links = eng.run_as(users.student1, open_fds)
    finally:
        os.close(shadow)
        sock.close()
    assert "/etc/shadow" not in links.values(), f"the child can read /etc/shadow through an fd: {links}"
    sockets = {fd: target for fd, target in links.items() if target.startswith("socket:")}
    assert list(sockets) == ["3"], f"the child should hold only its data socket (fd 3), holds {sockets}"
    forkserver_files = {
        target for target in fd_links(eng.forkserver.pid).values() if target.startswith(("pipe:", "socket:"))
    }
    shared = {fd: target for fd, target in links.items() if target in forkserver_files}
    assert not shared, f"the child inherited the fork server's fds: {shared}"


# --- T5 inherited memory ----------------------------------------------------------------


def test_t5_server_memory_is_not_in_the_child(make_engine, users, shared_dir):
    """Children fork from an exec'd fork server, so nothing this process holds is in their memory."""
    canary = secrets.token_hex(32).encode()  # lives only in this process; never sent
    eng = make_engine()
    eng.forkserver.start()
    dump = os.path.join(shared_dir, "child-memory.bin")

    def dump_memory(path):
        import ctypes
        import re

        # Changing uid from root can leave a process non-dumpable, which hands
        # its /proc files to root; any user code can undo that for itself.
        ctypes.CDLL(None).prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE

        regions = []
        with open("/proc/self/maps") as maps:
            for line in maps.read().splitlines():
                match = re.match(r"([0-9a-f]+)-([0-9a-f]+) r", line)
                if match and not line.endswith(("[vvar]", "[vsyscall]", "[vvar_vclock]")):
                    regions.append((int(match[1], 16), int(match[2], 16)))
        written = 0
        with open("/proc/self/mem", "rb", buffering=0) as mem, open(path, "wb") as out:
            for start, end in regions:
                for offset in range(start, end, 1 << 20):
                    try:
                        mem.seek(offset)
                        chunk = mem.read(min(1 << 20, end - offset))
                    except OSError:
                        break
                    out.write(chunk)
                    written += len(chunk)
        return written

    written = eng.run_as(users.student1, dump_memory, args=(dump,), timeout=120)
    assert written == os.path.getsize(dump) and written > 10 * 1024**2, f"setup: dump of {written} bytes"
    # The fork server's random socket path is in its memory but never sent to a run:
    # finding it shows the dump holds what the child inherited from its fork parent.
    for known in (users.student1.encode(), eng.forkserver.socket_path.encode()):
        assert file_contains(dump, known), f"setup: the dump lacks {known!r}, so it is not the child's memory"
    assert not file_contains(dump, canary), "a secret held by the server process is in the child's memory"


# --- T6 inherited environment -----------------------------------------------------------

#: What a run's environment may hold (SECURITY.md step 11), besides LC_* locale settings.
RUN_ENV_NAMES = {"HOME", "USER", "LOGNAME", "SHELL", "PATH", "LANG", "LANGUAGE", "TERM", "TZ", "MPLBACKEND"}


def test_t6_server_tokens_are_not_in_the_child_environment(make_engine, users, monkeypatch):
    """Tokens in the server's environment reach neither os.environ nor /proc/self/environ of a run."""
    tokens = {"JUPYTERHUB_API_TOKEN": secrets.token_hex(16), "JUPYTER_TOKEN": secrets.token_hex(16)}
    for key, value in tokens.items():
        monkeypatch.setenv(key, value)
    root_only_dir = "/root/pfsec-private-bin"
    monkeypatch.setenv("PATH", f"{root_only_dir}:{os.environ['PATH']}")
    eng = make_engine()
    eng.forkserver.start()

    def environment():
        import ctypes
        import os

        ctypes.CDLL(None).prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE, as in the T5 test
        with open("/proc/self/environ", "rb") as f:
            initial = f.read().decode(errors="replace")
        return {"environ": dict(os.environ), "initial": initial}

    got = eng.run_as(users.student1, environment)
    for key, value in tokens.items():
        assert key not in got["environ"], f"{key} is in the run's os.environ"
        assert value not in json.dumps(got["environ"]), f"the value of {key} is in the run's os.environ"
        assert key not in got["initial"] and value not in got["initial"], f"{key} is in /proc/self/environ"
    entry = pwd.getpwnam(users.student1)
    env = got["environ"]
    expected = {
        "HOME": entry.pw_dir,
        "USER": entry.pw_name,
        "LOGNAME": entry.pw_name,
        "SHELL": entry.pw_shell,
    }
    assert {key: env.get(key) for key in expected} == expected
    assert root_only_dir not in env.get("PATH", "").split(":"), f"root's PATH reached the run: {env['PATH']}"
    unexpected = sorted(key for key in env if key not in RUN_ENV_NAMES and not key.startswith("LC_"))
    assert not unexpected, f"variables not on the allowlist reached the run: {unexpected}"


# --- T7 terminal injection --------------------------------------------------------------

#: Runs in a new session whose controlling tty is a pty, as a root server started
#: from a terminal would; prints what its engine's run saw.
CTTY_SERVER = textwrap.dedent(
    """
    import fcntl, json, sys, termios
    from pipefork_kernel import Engine

    fcntl.ioctl(0, termios.TIOCSCTTY, 0)
    engine = Engine()
    engine.forkserver.start()
    with open(f"/proc/{engine.forkserver.pid}/stat") as f:
        forkserver_tty = int(f.read().rsplit(")", 1)[1].split()[4])
    try:
        result = engine.run_cell_as(sys.argv[1], sys.argv[2], timeout=60)
    finally:
        engine.close()
    print(json.dumps({"forkserver_tty": forkserver_tty, "status": result.status,
                      "error": result.error, "outputs": result.outputs}))
    """
)

TTY_PROBE = textwrap.dedent(
    """
    import json, os
    try:
        os.close(os.open("/dev/tty", os.O_RDWR))
        open_tty = 0
    except OSError as exc:
        open_tty = exc.errno
    with open("/proc/self/stat") as f:
        tty_nr = int(f.read().rsplit(")", 1)[1].split()[4])
    print(json.dumps({"open_tty": open_tty, "tty_nr": tty_nr, "sid": os.getsid(0), "pid": os.getpid()}))
    """
)


def test_t7_child_has_no_controlling_tty(users):
    """Even when the server has a controlling terminal, a run cannot reach it (no TIOCSTI injection)."""
    master, slave = pty.openpty()
    try:
        proc = subprocess.run(
            [sys.executable, "-I", "-c", CTTY_SERVER, users.student1, TTY_PROBE],
            stdin=slave,
            cwd="/",
            capture_output=True,
            text=True,
            start_new_session=True,
            timeout=120,
        )
    finally:
        os.close(master)
        os.close(slave)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.splitlines()[-1])
    assert report["forkserver_tty"] != 0, "setup: the fork server should have the pty as controlling tty"
    assert report["status"] == "ok", report["error"]
    seen = json.loads(stream_text(report["outputs"]))
    assert seen["open_tty"] != 0, "the run opened /dev/tty: it could inject keystrokes with TIOCSTI"
    assert seen["tty_nr"] == 0, f"the run has controlling tty {seen['tty_nr']:#x}"
    assert seen["sid"] == seen["pid"], "the run is not the leader of its own session (no setsid)"


# --- T8 untrusted bytes to root ---------------------------------------------------------


class CreatesMarker:
    """Unpickling this creates a file: proof that someone unpickled a child's bytes."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def framed(body: bytes) -> bytes:
    return HEADER.pack(len(body)) + body


def hostile_bytes(kind: str, marker: str) -> bytes:
    """What a malicious child writes straight to its data socket instead of real frames."""
    if kind == "garbage":
        return framed(b"\xff\xfe\x00 this is not JSON \x80\x81")
    if kind == "truncated":
        return HEADER.pack(1000) + b'{"type": "stream", "name": "stdout", "text": "'
    if kind == "oversized":
        return b"\xff\xff\xff\xff" + b"x" * 64
    if kind == "unknown-type":
        return framed(json.dumps({"type": "exec", "code": "import os"}).encode())
    if kind == "pickle-framed":
        return framed(pickle.dumps(CreatesMarker(marker)))
    assert kind == "pickle-raw"
    return pickle.dumps(CreatesMarker(marker))


@pytest.mark.parametrize(
    "kind", ["garbage", "truncated", "oversized", "unknown-type", "pickle-framed", "pickle-raw"]
)
def test_t8_hostile_frames_end_the_run_cleanly(engine, users, shared_dir, kind):
    """Root only parses bounded JSON: bad bytes end the run as a ProtocolError and nothing else."""
    marker = os.path.join(shared_dir, "unpickled-by-root")
    data = hostile_bytes(kind, marker)
    # A truncated frame only shows as such when the writer goes away.
    ending = "os._exit(0)" if kind == "truncated" else "time.sleep(60)"
    code = f"import os, time\nos.write(3, {data!r})\n{ending}"
    engine.forkserver.start()
    forkserver_pid = engine.forkserver.pid
    result = engine.run_cell_as(users.student1, code, timeout=30)
    assert result.status == "error", f"{kind}: status {result.status!r}, error {result.error}"
    assert result.error["ename"] == "ProtocolError", result.error
    assert not os.path.exists(marker), "root unpickled bytes written by a child"
    assert engine.run_as(users.student1, lambda: 6 * 7) == 42
    assert engine.forkserver.pid == forkserver_pid, "the fork server had to be restarted"


PEER_PROBE = textwrap.dedent(
    """
    import json, socket, sys
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.settimeout(10)
    try:
        sock.connect(sys.argv[1])
    except OSError as exc:
        print(json.dumps({"connected": False, "reply": None, "error": repr(exc)}))
        sys.exit()
    try:
        sock.send(json.dumps({"op": "status"}).encode())
        reply, error = sock.recv(65536).decode(errors="replace"), None
    except OSError as exc:
        reply, error = None, repr(exc)
    print(json.dumps({"connected": True, "reply": reply, "error": error}))
    """
)


def test_t8_control_socket_is_private_and_refuses_non_root_peers(engine, users):
    """0600 in a 0700 dir; and should modes ever be loosened, the peer-uid check still refuses."""
    engine.forkserver.start()
    path = engine.forkserver.socket_path
    directory = os.path.dirname(path)
    assert os.stat(path).st_mode & 0o777 == 0o600, f"control socket mode {os.stat(path).st_mode:o}"
    assert os.stat(directory).st_mode & 0o777 == 0o700, f"socket dir mode {os.stat(directory).st_mode:o}"
    os.chmod(directory, 0o711)
    os.chmod(path, 0o666)
    try:
        proc = run_as_plain_setuid(users.student1, [sys.executable, "-I", "-c", PEER_PROBE, path])
    finally:
        os.chmod(path, 0o600)
        os.chmod(directory, 0o700)
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout)
    assert seen["connected"], f"setup: the loosened socket should accept the connection: {seen['error']}"
    assert not seen["reply"], f"a non-root peer got a reply from the fork server: {seen['reply']!r}"
    assert engine.forkserver.status()["type"] == "status", "the fork server stopped serving root"


# --- T10 cross-user signals / ptrace ----------------------------------------------------

VICTIM = textwrap.dedent(
    """
    import os, time
    pidfile = os.environ["PIDFILE"]
    with open(pidfile + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.rename(pidfile + ".tmp", pidfile)
    deadline = time.monotonic() + 30
    while not os.path.exists(os.environ["DONEFILE"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    print("victim survived")
    """
)

ATTACKER = textwrap.dedent(
    """
    import json, os, signal, time
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(os.environ["PIDFILE"]) and time.monotonic() < deadline:
            time.sleep(0.05)
        pid = int(open(os.environ["PIDFILE"]).read())
        seen = {"pid": pid}
        try:
            os.kill(pid, signal.SIGKILL)
            seen["kill"] = 0
        except OSError as exc:
            seen["kill"] = exc.errno
        try:
            open(f"/proc/{pid}/mem", "rb").close()
            seen["mem"] = 0
        except OSError as exc:
            seen["mem"] = exc.errno
        print(json.dumps(seen))
    finally:
        open(os.environ["DONEFILE"], "w").close()
    """
)


def test_t10_child_cannot_signal_or_trace_root_processes(engine, users):
    """The fork server (the child's parent) and the server are root: out of the child's reach.

    Signal 0 runs kill()'s permission check without sending anything, so a
    regression fails this test instead of killing the test process.
    """

    def attack(server_pid):
        import ctypes
        import os

        libc = ctypes.CDLL(None, use_errno=True)
        ptrace_seize, ptrace_detach = 0x4206, 17

        def errno_of(action):
            try:
                action()
            except OSError as exc:
                return exc.errno
            return 0

        def seize(pid):
            if libc.ptrace(ptrace_seize, pid, None, None) != 0:
                raise OSError(ctypes.get_errno(), "ptrace")
            libc.ptrace(ptrace_detach, pid, None, None)

        seen = {"ppid": os.getppid()}
        for name, pid in (("forkserver", os.getppid()), ("server", server_pid)):
            seen[name] = {
                "kill": errno_of(lambda pid=pid: os.kill(pid, 0)),
                "mem": errno_of(lambda pid=pid: open(f"/proc/{pid}/mem", "rb").close()),
                "ptrace": errno_of(lambda pid=pid: seize(pid)),
            }
        return seen

    seen = engine.run_as(users.student1, attack, args=(os.getpid(),))
    assert seen["ppid"] == engine.forkserver.pid, "setup: the child's parent should be the fork server"
    for name in ("forkserver", "server"):
        for how, number in seen[name].items():
            assert number in (errno.EPERM, errno.EACCES), (
                f"the child could {how} the {name}: {errno_name(number)}"
            )


def test_t10_child_cannot_signal_another_users_run(engine, users, shared_dir):
    """student1 tries SIGKILL and /proc/<pid>/mem on student2's concurrent run, which must survive."""
    env = {"PIDFILE": os.path.join(shared_dir, "victim.pid"), "DONEFILE": os.path.join(shared_dir, "done")}

    async def both():
        return await asyncio.gather(
            engine.arun_cell_as(users.student2, VICTIM, env=env, timeout=60),
            engine.arun_cell_as(users.student1, ATTACKER, env=env, timeout=60),
        )

    victim, attacker = asyncio.run(both())
    assert attacker.status == "ok", attacker.error
    seen = json.loads(texts(attacker))
    assert seen["pid"] == victim.pid, "setup: the attacker should have found the victim's pid"
    assert seen["kill"] == errno.EPERM, f"student1 could SIGKILL student2's run: {errno_name(seen['kill'])}"
    assert seen["mem"] == errno.EACCES, f"student1 could open student2's memory: {errno_name(seen['mem'])}"
    assert victim.status == "ok" and texts(victim) == "victim survived\n", (victim.status, victim.error)


# --- T11 orphans ------------------------------------------------------------------------

DOUBLE_FORK = textwrap.dedent(
    """
    import os, time
    pidfile = os.environ["PIDFILE"]
    middle = os.fork()
    if middle == 0:
        os.setsid()
        if os.fork() == 0:
            with open(pidfile + ".tmp", "w") as f:
                f.write(str(os.getpid()))
            os.rename(pidfile + ".tmp", pidfile)
            devnull = os.open("/dev/null", os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(devnull, fd)
            os.closerange(3, 1024)
            os.execv("/bin/sleep", ["sleep", "300"])
        os._exit(0)
    os.waitpid(middle, 0)
    while not os.path.exists(pidfile):
        time.sleep(0.02)
    print("daemon started")
    """
)


@pytest.mark.parametrize("ending", ["finished", "timed-out"])
def test_t11_double_forked_daemon_does_not_outlive_its_run(engine, users, shared_dir, ending):
    """A setsid'd grandchild escapes the run's process group; the fork server must still kill it."""
    pidfile = os.path.join(shared_dir, "daemon.pid")
    code = DOUBLE_FORK + ("time.sleep(60)\n" if ending == "timed-out" else "")
    result = engine.run_cell_as(users.student1, code, env={"PIDFILE": pidfile}, timeout=3)
    assert result.status == ("timeout" if ending == "timed-out" else "ok"), (result.status, result.error)
    assert texts(result) == "daemon started\n", "setup: the daemon did not start"
    with open(pidfile) as f:
        daemon = int(f.read())
    left = wait_until_no_processes(pwd.getpwnam(users.student1).pw_uid)
    assert daemon not in left, f"the double-forked daemon {daemon} outlived its run ({ending})"
    assert not left and not pgrep(users.student1), f"processes of the user outlived the run: {left}"


# --- T12 process and memory bombs -------------------------------------------------------

FORK_BOMB = textwrap.dedent(
    """
    import os
    while True:
        try:
            os.fork()
        except OSError:
            pass
    """
)

MEMORY_BOMB = textwrap.dedent(
    """
    blocks = []
    for _ in range(20):  # 2 GiB in all, twice the limit
        blocks.append(bytearray(100 * 1024 * 1024))
    print("allocated", len(blocks))
    """
)


def test_t12_fork_bomb_is_capped_and_others_still_run(make_engine, users):
    """RLIMIT_NPROC caps the bomb, the timeout ends it, and another user's run is served meanwhile."""
    nproc = 40
    eng = make_engine(RunLimits__rlimit_nproc=nproc, RunLimits__rlimit_as=GiB)
    uid = pwd.getpwnam(users.student1).pw_uid

    async def scenario():
        bomb = asyncio.ensure_future(eng.arun_cell_as(users.student1, FORK_BOMB, timeout=5))
        await asyncio.sleep(1.0)
        other = asyncio.ensure_future(eng.arun_cell_as(users.student2, "print('still served')", timeout=30))
        peak = 0
        while not bomb.done():
            peak = max(peak, len(processes_of(uid)))
            await asyncio.sleep(0.1)
        return await bomb, await other, peak

    start = time.monotonic()
    bomb, other, peak = asyncio.run(scenario())
    assert bomb.status in ("timeout", "error", "crashed"), (bomb.status, bomb.error)
    assert time.monotonic() - start < 30, "the fork bomb run did not end near its timeout"
    assert peak > 1, "setup: the bomb never forked"
    assert peak <= nproc, f"the fork bomb reached {peak} processes despite RLIMIT_NPROC={nproc}"
    assert other.status == "ok" and texts(other) == "still served\n", (other.status, other.error)
    assert not wait_until_no_processes(uid), "processes of the fork bomb outlived its run"


def test_t12_memory_bomb_gets_memory_error(make_engine, users):
    """RLIMIT_AS turns a runaway allocation into a MemoryError inside the run."""
    eng = make_engine(RunLimits__rlimit_nproc=40, RunLimits__rlimit_as=GiB)
    result = eng.run_cell_as(users.student1, MEMORY_BOMB, timeout=60)
    assert result.status == "error", (result.status, result.error, texts(result))
    assert result.error["ename"] == "MemoryError", result.error
    assert eng.run_cell_as(users.student2, "print('fine')").status == "ok"


# --- T13 fork from threads --------------------------------------------------------------


def test_t13_fork_server_is_single_threaded(engine, users):
    """fork() copies only the calling thread; a second thread in the zygote could leave locks held."""
    threaded = "import threading\nts = [threading.Thread(target=print) for _ in range(4)]\n"
    threaded += "[t.start() for t in ts]\n[t.join() for t in ts]\nimport time\ntime.sleep(1)"
    engine.forkserver.start()
    pid = engine.forkserver.pid

    async def during_and_after():
        run = asyncio.ensure_future(engine.arun_cell_as(users.student1, threaded, timeout=30))
        await asyncio.sleep(0.5)
        during = os.listdir(f"/proc/{pid}/task")
        await asyncio.gather(run, engine.arun_as(users.student2, lambda: 1, on_output=None))
        return during

    during = asyncio.run(during_and_after())
    after = os.listdir(f"/proc/{pid}/task")
    assert engine.forkserver.pid == pid, "setup: the fork server restarted during the test"
    assert during == [str(pid)], f"the fork server ran threads during a run: {during}"
    assert after == [str(pid)], f"the fork server ran threads after runs: {after}"


# --- T14 setuid binaries ----------------------------------------------------------------


def test_t14_setuid_root_binary_does_not_give_root_back(engine, users):
    """PR_SET_NO_NEW_PRIVS: exec of a setuid-root `id` keeps the user's effective uid."""
    directory = tempfile.mkdtemp(prefix="pfsec-suid-", dir="/var/tmp")
    try:
        os.chmod(directory, 0o755)
        if os.statvfs(directory).f_flag & os.ST_NOSUID:
            pytest.skip(f"{directory} is on a nosuid filesystem: setuid bits do nothing there")
        suid_id = os.path.join(directory, "id")
        shutil.copy("/usr/bin/id", suid_id)
        os.chown(suid_id, 0, 0)
        os.chmod(suid_id, 0o4755)
        control = run_as_plain_setuid(users.student1, [suid_id, "-u"])
        if control.stdout.strip() != "0":
            pytest.skip(f"setuid-root binaries do not grant root here at all: {control}")

        def effective_uid(path):
            import subprocess

            out = subprocess.run([path, "-u"], capture_output=True, text=True)
            return [out.returncode, out.stdout.strip(), out.stderr]

        code, euid, stderr = engine.run_as(users.student1, effective_uid, args=(suid_id,))
    finally:
        shutil.rmtree(directory)
    assert code == 0, stderr
    assert euid == str(pwd.getpwnam(users.student1).pw_uid), f"the setuid-root copy of id ran as euid {euid}"


# --- T15 keyring ------------------------------------------------------------------------


def join_new_session_keyring() -> None:
    """Give this process its own session keyring, as pam_keyinit gives a root login.

    Without one, ``@s`` is root's per-uid keyring, which a process that merely
    changed uid no longer searches anyway, and the test would prove nothing.
    This process keeps the (emptied) keyring afterwards, which is harmless.
    """
    library = ctypes.util.find_library("keyutils")
    if library is None:
        pytest.skip("libkeyutils (Debian's keyutils) is not installed")
    keyutils = ctypes.CDLL(library, use_errno=True)
    if keyutils.keyctl_join_session_keyring(None) < 0:
        pytest.skip(f"cannot join a session keyring here: {os.strerror(ctypes.get_errno())}")


def test_t15_root_session_keys_are_not_readable_from_the_child(make_engine, users):
    """The child joins a fresh session keyring before setuid, so it no longer possesses root's keys."""
    if shutil.which("keyctl") is None:
        pytest.skip("keyctl is not installed (Debian package keyutils)")
    join_new_session_keyring()
    secret = secrets.token_hex(16)
    added = subprocess.run(
        ["keyctl", "add", "user", "pfsec_key", secret, "@s"], capture_output=True, text=True, check=True
    )
    key_id = added.stdout.strip()
    try:
        eng = make_engine()
        eng.forkserver.start()
        control = run_as_plain_setuid(users.student1, ["keyctl", "print", key_id])
        assert control.stdout.strip() == secret, f"setup: a plain setuid child should read the key: {control}"

        def keyring_view(key_id):
            import subprocess

            printed = subprocess.run(["keyctl", "print", key_id], capture_output=True, text=True)
            shown = subprocess.run(["keyctl", "show", "@s"], capture_output=True, text=True)
            return [printed.returncode, printed.stdout + printed.stderr, shown.stdout + shown.stderr]

        code, printed, shown = eng.run_as(users.student1, keyring_view, args=(key_id,))
    finally:
        subprocess.run(["keyctl", "unlink", key_id, "@s"], capture_output=True)
    assert code != 0 and secret not in printed, f"the child read root's session key: {printed!r}"
    assert "pfsec_key" not in shown and key_id not in shown, f"root's key is in the child's keyring: {shown}"


def plant(user: str, relative: str, marker_dir: str, tag: str) -> None:
    """A file in the user's home that, if executed, records which uid ran it."""
    entry = pwd.getpwnam(user)
    path = os.path.join(entry.pw_dir, relative)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(f"import os\nopen(os.path.join({marker_dir!r}, '{tag}-%d' % os.getuid()), 'w').close()\n")
    directory = entry.pw_dir
    for part in relative.split("/")[:-1]:
        directory = os.path.join(directory, part)
        os.chown(directory, entry.pw_uid, entry.pw_gid)
    os.chown(path, entry.pw_uid, entry.pw_gid)


def test_t16_user_planted_files_never_run_as_root(make_engine, users, shared_dir):
    """IPython startup files, usercustomize and .pth files in a user's home never run as root."""
    user = users.student1
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    plant(user, ".ipython/profile_default/startup/00-planted.py", shared_dir, "startup")
    plant(user, f".local/lib/{version}/site-packages/usercustomize.py", shared_dir, "usercustomize")
    pth = os.path.join(pwd.getpwnam(user).pw_dir, f".local/lib/{version}/site-packages/planted.pth")
    with open(pth, "w") as f:
        f.write(f"import os; open(os.path.join({shared_dir!r}, 'pth-%d' % os.getuid()), 'w').close()\n")
    # A module shadowing one the fork server imports, where root's cwd and
    # PYTHONPATH point: the fork server must import nothing from there.
    shadow_dir = os.path.join(pwd.getpwnam(user).pw_dir, "shadow")
    plant(user, "shadow/dill.py", shared_dir, "shadow")
    old_cwd = os.getcwd()
    try:
        os.chdir(shadow_dir)
        os.environ["PYTHONPATH"] = shadow_dir
        engine = make_engine()
        result = engine.run_cell_as(user, "import getpass\nprint(getpass.getuser())")
        assert result.status == "ok" and texts(result) == f"{user}\n"
        markers = [name for name in os.listdir(shared_dir) if "-" in name]
        assert not [m for m in markers if m.endswith("-0")], f"ran as root: {markers}"
    finally:
        os.chdir(old_cwd)
        os.environ.pop("PYTHONPATH", None)
        shutil.rmtree(shadow_dir, ignore_errors=True)
        shutil.rmtree(os.path.join(pwd.getpwnam(user).pw_dir, ".ipython"), ignore_errors=True)
        shutil.rmtree(os.path.join(pwd.getpwnam(user).pw_dir, ".local"), ignore_errors=True)
