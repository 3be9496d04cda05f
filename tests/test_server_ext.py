"""The server extension through a real Jupyter Server (pytest-jupyter), as root."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import pwd
import secrets
import shutil
import subprocess
import sys
import time

import dill
import pytest
from jupyter_server.auth.identity import IdentityProvider, User
from pytest_jupyter.jupyter_core import *  # noqa: F403 - fixtures, for this module only
from pytest_jupyter.jupyter_server import *  # noqa: F403
from tornado.httpclient import HTTPClientError

from jupyter_server_ext.contents import NoFollowContentsManager
from pipefork_kernel import PolicyError
from pipefork_kernel.client import RunClient
from pipefork_kernel.kernelspec import SPEC_FILE

#: Lives in this (the server's) process only; must never show up in a child.
SERVER_CANARY = "pfcanary-" + secrets.token_hex(16)
SERVER_TOKEN = "pftest-jupyter-token-" + secrets.token_hex(8)


class HeaderIdentityProvider(IdentityProvider):
    """Tests' stand-in for JupyterHub: the identity comes from a header set by the test."""

    def get_user(self, handler):
        name = handler.request.headers.get("X-Test-Identity")
        return User(username=name) if name else None

    def is_token_authenticated(self, handler):
        return True  # like a token (or JupyterHub's OAuth) header: no XSRF cookie involved


@pytest.fixture
def jp_root_dir(shared_dir, users):
    """A notebook tree the test users can reach: one notebook each, owned by them."""
    root = os.path.join(shared_dir, "root")
    os.makedirs(root)
    os.chmod(root, 0o755)
    for user in (users.student1, users.student2):
        entry = pwd.getpwnam(user)
        folder = os.path.join(root, user)
        os.makedirs(folder)
        path = os.path.join(folder, "hw.ipynb")
        with open(path, "w") as f:
            f.write('{"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}')
        for item in (folder, path):
            os.chown(item, entry.pw_uid, entry.pw_gid)
    return root


@pytest.fixture
def audit_file(shared_dir):
    return os.path.join(shared_dir, "audit.jsonl")


@pytest.fixture
def identities():
    """Which identity provider the server uses; tests that need two people override it."""
    return False


@pytest.fixture
def jp_server_config(audit_file, users, identities, jp_env_jupyter_path):
    kernels = jp_env_jupyter_path / "kernels" / "pipefork"
    kernels.mkdir(parents=True, exist_ok=True)
    shutil.copy(SPEC_FILE, kernels / "kernel.json")
    config = {
        "ServerApp": {
            "jpserver_extensions": {"jupyter_server_ext": True},
            "contents_manager_class": NoFollowContentsManager,
        },
        "PipeforkApp": {"audit_log_path": audit_file},
        "RunPolicy": {"admin_identities": ["teacher"]},
    }
    if identities:
        config["ServerApp"]["identity_provider_class"] = HeaderIdentityProvider
    return config


@pytest.fixture
def server(jp_serverapp, monkeypatch):
    """The running server, with a token and a canary in its environment."""
    monkeypatch.setenv("JUPYTER_TOKEN", SERVER_TOKEN)
    return jp_serverapp.extension_manager.extension_apps["jupyter_server_ext"].pop()


def audit_records(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def lines(body: bytes) -> list[dict]:
    return [json.loads(line) for line in body.decode().splitlines() if line.strip()]


async def post_run(jp_fetch, body: dict, identity: str | None = None):
    headers = {"X-Test-Identity": identity} if identity else {}
    response = await jp_fetch(
        "pipefork", "api", "runs", method="POST", body=json.dumps(body), headers=headers
    )
    return lines(response.body)


async def expect_error(jp_fetch, body, code: int, text: str, identity: str | None = None, raw=None):
    headers = {"X-Test-Identity": identity} if identity else {}
    with pytest.raises(HTTPClientError) as info:
        await jp_fetch(
            "pipefork",
            "api",
            "runs",
            method="POST",
            body=raw if raw is not None else json.dumps(body),
            headers=headers,
        )
    assert info.value.code == code
    message = json.loads(info.value.response.body)["message"]
    assert text in message, message
    return message


async def test_run_as_notebook_owner(server, jp_fetch, users):
    code = (
        "import os\nfrom IPython.display import HTML, display\n"
        "print('uid', os.getuid())\ndisplay(HTML('<b>rich</b>'))\nos.getcwd()"
    )
    out = await post_run(jp_fetch, {"path": f"{users.student1}/hw.ipynb", "code": code})
    uid = pwd.getpwnam(users.student1).pw_uid
    assert out[0] == {"output_type": "stream", "name": "stdout", "text": f"uid {uid}\n"}
    assert out[1]["output_type"] == "display_data" and out[1]["data"]["text/html"] == "<b>rich</b>"
    assert out[2]["output_type"] == "execute_result"
    assert os.path.basename(out[2]["data"]["text/plain"].strip("'")) == users.student1  # cwd: the notebook's
    final = out[-1]
    assert final["final"] is True and final["status"] == "ok" and final["user"] == users.student1
    assert final["uid"] == uid and final["exit_code"] == 0 and final["duration"] > 0


async def test_lines_stream_before_the_run_ends(
    server, http_server_client, jp_base_url, jp_auth_header, users
):
    arrivals: list[tuple[float, bytes]] = []
    code = "import time\nfor i in range(3):\n    print(i, flush=True)\n    time.sleep(0.5)"
    await http_server_client.fetch(
        f"{jp_base_url}pipefork/api/runs",
        method="POST",
        headers=jp_auth_header,
        body=json.dumps({"user": users.student1, "code": code}),
        streaming_callback=lambda chunk: arrivals.append((time.monotonic(), chunk)),
        request_timeout=60,
    )
    end = arrivals[-1][0]
    assert end - arrivals[0][0] > 0.8, "the first line only arrived when the run ended"
    out = lines(b"".join(chunk for _, chunk in arrivals))
    assert "".join(o.get("text", "") for o in out) == "0\n1\n2\n"


async def test_function_payload(server, jp_fetch, users):
    def add(a, b):
        import getpass

        print("adding as", getpass.getuser())
        return {"sum": a + b}

    payload = base64.b64encode(dill.dumps((add, (2, 3), {}), recurse=True)).decode()
    out = await post_run(jp_fetch, {"user": users.student2, "function": payload})
    assert out[0]["text"] == f"adding as {users.student2}\n"
    assert out[-1]["status"] == "ok" and out[-1]["result"] == {"sum": 5}


async def test_timeout_and_crash_are_final_lines(server, jp_fetch, users):
    out = await post_run(jp_fetch, {"user": users.student1, "code": "while True: pass", "timeout": 0.5})
    assert out[-1]["status"] == "timeout"
    out = await post_run(jp_fetch, {"user": users.student1, "code": "import os; os.kill(os.getpid(), 11)"})
    assert out[-1]["status"] == "crashed" and out[-1]["signal"] == 11


async def test_status_and_whoami(server, jp_fetch, users):
    await post_run(jp_fetch, {"user": users.student1, "code": "1"})
    status = json.loads((await jp_fetch("pipefork", "api", "status")).body)
    assert status["forkserver"]["running"] is True
    assert status["forkserver"]["pid"] == server.engine.forkserver.pid
    assert status["forkserver"]["threads"] == 1
    assert status["runs"]["by_status"]["ok"] >= 1 and status["runs"]["active"] == []
    assert status["policy"]["mode"] == "owner" and status["policy"]["min_uid"] == 1000
    assert SERVER_TOKEN not in json.dumps(status)
    assert server.serverapp.identity_provider.token not in json.dumps(status)

    who = json.loads(
        (await jp_fetch("pipefork", "api", "whoami", params={"path": f"{users.student2}/hw.ipynb"})).body
    )
    assert who["user"] == users.student2 and who["allowed"] is True and who["admin"] is True


async def test_error_codes(server, jp_fetch, users, jp_root_dir):
    path = f"{users.student1}/hw.ipynb"
    await expect_error(jp_fetch, None, 400, "not valid JSON", raw="{nope")
    await expect_error(jp_fetch, {"path": path}, 400, "exactly one of 'code'")
    await expect_error(
        jp_fetch, {"path": path, "code": "1", "function": "AA=="}, 400, "exactly one of 'code'"
    )
    await expect_error(jp_fetch, {"code": "1"}, 400, "exactly one of 'path'")
    await expect_error(jp_fetch, {"path": path, "code": "1", "timeout": -1}, 400, "positive number")
    await expect_error(jp_fetch, {"user": "root", "code": "1"}, 403, "uid 0")
    await expect_error(jp_fetch, {"user": "pftest_nobody_like_this", "code": "1"}, 404, "no such user")
    await expect_error(jp_fetch, {"path": "nothere/hw.ipynb", "code": "1"}, 404, "no such file")
    await expect_error(jp_fetch, {"path": path, "code": "x" * (17 * 1024 * 1024)}, 413, "over the limit")
    await expect_error(
        jp_fetch, {"path": "../../../etc/passwd", "code": "1"}, 403, "outside the server's root_dir"
    )
    os.symlink("/etc", os.path.join(jp_root_dir, "escape"))
    await expect_error(jp_fetch, {"path": "escape/passwd", "code": "1"}, 403, "outside the server's root_dir")


async def test_per_user_cap_gives_429(server, jp_fetch, users):
    server.engine.forkserver.max_runs_per_user = 1
    server.engine.forkserver.stop()
    slow = asyncio.ensure_future(
        post_run(jp_fetch, {"user": users.student1, "code": "import time; time.sleep(3)"})
    )
    await asyncio.sleep(1.0)
    await expect_error(jp_fetch, {"user": users.student1, "code": "1"}, 429, "runs in progress")
    assert (await post_run(jp_fetch, {"user": users.student2, "code": "1"}))[-1]["status"] == "ok"
    assert (await slow)[-1]["status"] == "ok"


async def test_client_disconnect_kills_the_run(
    server, http_server_client, jp_base_url, jp_auth_header, users
):
    """A client that hangs up mid-run (here a raw socket, closed for real) ends the run."""
    code = "import subprocess\nprint('started', flush=True)\nsubprocess.run(['sleep', '120'])"
    body = json.dumps({"user": users.student1, "code": code}).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", http_server_client.get_http_port())
    head = (
        f"POST {jp_base_url}pipefork/api/runs HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: {jp_auth_header['Authorization']}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    writer.write(head.encode() + body)
    received = b""
    while b"started" not in received:
        received += await asyncio.wait_for(reader.read(4096), 30)
    assert _processes_of(users.student1), "the run should be going"
    writer.close()
    for _ in range(50):
        if not _processes_of(users.student1):
            break
        await asyncio.sleep(0.1)
    assert _processes_of(users.student1) == []
    records = audit_records(server.audit_log_path)
    assert records[-1]["status"] == "cancelled"


def _processes_of(user: str) -> list[str]:
    return subprocess.run(["pgrep", "-a", "-u", user], capture_output=True, text=True).stdout.splitlines()


async def test_no_server_secrets_in_the_child(server, jp_fetch, users, shared_dir):
    """The server's token and a canary in its memory are not in the child's env or memory."""
    assert SERVER_CANARY  # keep it alive in this process
    dump = os.path.join(shared_dir, "memory.bin")
    code = f"""
import os, re
env = open('/proc/self/environ', 'rb').read()
print('token vars:', [k for k in os.environ if 'TOKEN' in k])
with open({dump!r}, 'wb') as out, open('/proc/self/maps') as maps, open('/proc/self/mem', 'rb', 0) as mem:
    for line in maps:
        start, end = (int(x, 16) for x in line.split()[0].split('-'))
        if 'r' not in line.split()[1] or '[vvar' in line or '[vsyscall' in line:
            continue
        try:
            mem.seek(start)
            out.write(mem.read(end - start))
        except (OSError, ValueError, OverflowError):
            pass
print('env has token:', {SERVER_TOKEN[:12]!r} in env.decode(errors='replace'))
"""
    out = await post_run(jp_fetch, {"user": users.student1, "code": code})
    text = "".join(o.get("text", "") for o in out[:-1])
    assert out[-1]["status"] == "ok", out
    assert "token vars: []" in text and "env has token: False" in text
    with open(dump, "rb") as f:
        memory = f.read()
    assert len(memory) > 10_000_000, "the memory dump looks incomplete"
    assert SERVER_CANARY.encode() not in memory
    assert SERVER_TOKEN.encode() not in memory


async def test_audit_records_success_and_refusal(server, jp_fetch, users, audit_file):
    await post_run(jp_fetch, {"user": users.student1, "code": "print(1)"})
    await expect_error(jp_fetch, {"user": "root", "code": "1"}, 403, "uid 0")
    records = audit_records(audit_file)
    ok, refused = records[-2], records[-1]
    assert ok["status"] == "ok" and ok["user"] == users.student1 and ok["kind"] == "code"
    assert ok["sha256"] == __import__("hashlib").sha256(b"print(1)").hexdigest()
    assert ok["identity"] and ok["duration"] > 0 and ok["uid"] == pwd.getpwnam(users.student1).pw_uid
    assert refused["status"] == "refused" and "uid 0" in refused["reason"]
    assert oct(os.stat(audit_file).st_mode & 0o777) == "0o600"


async def test_fork_server_restarts_after_being_killed(server, jp_fetch, users):
    old = server.engine.forkserver.pid
    os.kill(old, 9)
    server.engine.forkserver.process.wait()
    out = await post_run(jp_fetch, {"user": users.student1, "code": "print('back')"})
    assert out[-1]["status"] == "ok"
    assert server.engine.forkserver.pid != old


@pytest.mark.parametrize("identities", [True])
async def test_identity_policy(server, jp_fetch, users, identities):
    """An identity may run only as itself; the admin may run as anyone allowed."""
    s1, s2 = users.student1, users.student2
    ok = await post_run(jp_fetch, {"path": f"{s1}/hw.ipynb", "code": "1"}, identity=s1)
    assert ok[-1]["status"] == "ok"
    message = await expect_error(
        jp_fetch, {"path": f"{s2}/hw.ipynb", "code": "1"}, 403, "rule 'owner'", identity=s1
    )
    assert f"not as {s2!r}" in message
    await expect_error(jp_fetch, {"user": s2, "code": "1"}, 403, "rule 'owner'", identity=s1)
    admin = await post_run(jp_fetch, {"path": f"{s2}/hw.ipynb", "code": "1"}, identity="teacher")
    assert admin[-1]["status"] == "ok" and admin[-1]["user"] == s2
    who = json.loads(
        (
            await jp_fetch(
                "pipefork",
                "api",
                "whoami",
                params={"path": f"{s2}/hw.ipynb"},
                headers={"X-Test-Identity": s1},
            )
        ).body
    )
    assert who["allowed"] is False and who["admin"] is False

    # Owner kernels obey the same rule: s1 cannot open s2's notebook with a pipefork kernel.
    session = {
        "path": f"{s2}/hw.ipynb",
        "type": "notebook",
        "name": "hw.ipynb",
        "kernel": {"name": "pipefork"},
    }
    with pytest.raises(HTTPClientError) as info:
        await jp_fetch(
            "api", "sessions", method="POST", body=json.dumps(session), headers={"X-Test-Identity": s1}
        )
    assert info.value.code == 403
    response = await jp_fetch(
        "api", "sessions", method="POST", body=json.dumps(session), headers={"X-Test-Identity": s2}
    )
    kernel_id = json.loads(response.body)["kernel"]["id"]
    # ... and cannot drive s2's running kernel either.
    with pytest.raises(HTTPClientError) as info:
        await jp_fetch(
            "api", "kernels", kernel_id, "interrupt", method="POST", body="", headers={"X-Test-Identity": s1}
        )
    assert info.value.code == 403
    await jp_fetch("api", "kernels", kernel_id, method="DELETE", headers={"X-Test-Identity": s2})


def server_url(http_server_client, jp_base_url) -> str:
    return http_server_client.get_url(jp_base_url)


async def test_python_client(server, http_server_client, jp_base_url, users):
    client = RunClient(server_url(http_server_client, jp_base_url), server.serverapp.identity_provider.token)
    seen = []
    code = "import getpass\nfrom IPython.display import HTML, display\nprint(getpass.getuser())\n"
    code += "display(HTML('<script>x()</script><i>ok</i>'))"
    result = await asyncio.to_thread(client.run_cell, code, user=users.student2, on_output=seen.append)
    assert result.status == "ok" and result.user == users.student2
    assert seen[0]["text"] == f"{users.student2}\n"
    assert seen[1]["data"]["text/html"] == "<i>ok</i>", "another user's HTML is sanitized"

    def square(x):
        return x * x

    assert await asyncio.to_thread(client.run_function, square, (7,), user=users.student1) == 49
    with pytest.raises(PolicyError, match="403"):
        await asyncio.to_thread(client.run_cell, "1", user="root")


async def test_magic_in_a_non_root_kernel_uses_the_server(
    server, http_server_client, jp_base_url, users, shared_dir
):
    script = os.path.join(shared_dir, "magic_client.py")
    cell = f"%%run_as {users.student2}\nimport getpass\nprint('via server', getpass.getuser())"
    with open(script, "w") as f:
        f.write(
            "from IPython.core.interactiveshell import InteractiveShell\n"
            "shell = InteractiveShell.instance()\n"
            "shell.run_cell('%load_ext pipefork_kernel')\n"
            f"shell.run_cell({cell!r})\n"
        )
    env = {
        **os.environ,
        "PIPEFORK_URL": server_url(http_server_client, jp_base_url),
        "PIPEFORK_TOKEN": server.serverapp.identity_provider.token,
    }
    process = await asyncio.create_subprocess_exec(
        "runuser",
        "-u",
        users.student1,
        "--",
        sys.executable,
        script,
        cwd=shared_dir,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 120)
    assert f"via server {users.student2}" in stdout.decode(), stderr.decode()


def as_identity(name: str) -> dict[str, str]:
    return {"X-Test-Identity": name}


async def expect_status(jp_fetch, code: int, *parts, **kwargs) -> str:
    with pytest.raises(HTTPClientError) as info:
        await jp_fetch(*parts, **kwargs)
    assert info.value.code == code, info.value
    return json.loads(info.value.response.body or b"{}").get("message", "")


@pytest.mark.parametrize("identities", [True])
async def test_non_admins_get_nothing_that_runs_as_root(server, jp_fetch, users, identities, jp_root_dir):
    """Terminals, stock kernels and other people's files run as root: not for non-admins."""
    s1, s2 = users.student1, users.student2
    me = as_identity(s1)
    message = await expect_status(jp_fetch, 403, "api", "terminals", method="POST", body="{}", headers=me)
    assert "admin" in message
    kernel = json.dumps({"name": "python3"})
    message = await expect_status(jp_fetch, 403, "api", "kernels", method="POST", body=kernel, headers=me)
    assert "pipefork" in message
    secret = os.path.join(jp_root_dir, "root-only.txt")
    with open(secret, "w") as f:
        f.write("root's")
    os.chmod(secret, 0o600)
    await expect_status(jp_fetch, 403, "api", "contents", "root-only.txt", headers=me)
    await expect_status(jp_fetch, 403, "api", "contents", s2, "hw.ipynb", headers=me)
    note = json.dumps({"type": "file", "format": "text", "content": "hi"})
    await expect_status(jp_fetch, 403, "api", "contents", s2, "new.txt", method="PUT", body=note, headers=me)
    own = await jp_fetch("api", "contents", s1, "hw.ipynb", headers=me)
    assert json.loads(own.body)["type"] == "notebook"
    listing = await jp_fetch("api", "contents", headers=me)
    assert {item["name"] for item in json.loads(listing.body)["content"]} >= {s1, s2}
    saved = await jp_fetch("api", "contents", s1, "new.txt", method="PUT", body=note, headers=me)
    assert json.loads(saved.body)["name"] == "new.txt"
    # A refusal does not reveal whether an account exists.
    await expect_error(jp_fetch, {"user": "pftest_nobody_like_this", "code": "1"}, 403, "rule", identity=s1)


async def test_root_server_does_not_follow_planted_links(server, jp_fetch, users, jp_root_dir, shared_dir):
    """A student's symlink to a root-only file is neither read nor written through, checkpoints too."""
    s1 = users.student1
    entry = pwd.getpwnam(s1)
    target = os.path.join(shared_dir, "root-target.txt")
    with open(target, "w") as f:
        f.write("untouched")
    os.chmod(target, 0o600)
    link = os.path.join(jp_root_dir, s1, "link.txt")
    os.symlink(target, link)
    os.lchown(link, entry.pw_uid, entry.pw_gid)
    await expect_status(jp_fetch, 403, "api", "contents", s1, "link.txt")
    note = json.dumps({"type": "file", "format": "text", "content": "overwritten"})
    await expect_status(jp_fetch, 403, "api", "contents", s1, "link.txt", method="PUT", body=note)
    with open(target) as f:
        assert f.read() == "untouched"

    private = os.path.join(shared_dir, "root-private-dir")
    os.mkdir(private, 0o700)
    checkpoints = os.path.join(jp_root_dir, s1, ".ipynb_checkpoints")
    os.symlink(private, checkpoints)
    os.lchown(checkpoints, entry.pw_uid, entry.pw_gid)
    await expect_status(
        jp_fetch, 403, "api", "contents", s1, "hw.ipynb", "checkpoints", method="POST", body=""
    )
    assert os.listdir(private) == []
