"""``python -m pipefork_kernel doctor``: check the prerequisites of running as a user.

Each check prints OK or FAIL with the fix.  The checks that matter most run
*as the user*, in a real forked child, because only that shows what the user
can actually read.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass

from .errors import PipeforkError
from .runner import Engine

#: Runs as the target user; prints one JSON line the parent parses.
PROBE = r"""
import importlib, json, os, sys
from pipefork_kernel.child import unreadable_path
home = os.environ.get("HOME", "/")
report = {"home": home, "home_ok": os.access(home, os.R_OK | os.X_OK)}
report["unreadable_paths"] = [p for p in sys.path if p and unreadable_path(p)]
try:
    importlib.import_module("xml.dom.minidom")
    report["import_ok"] = True
except Exception as exc:
    report["import_ok"] = False
    report["import_error"] = str(exc)
print(json.dumps(report))
"""


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def run_checks(engine: Engine, user: str) -> list[Check]:
    checks = [
        Check(
            "running as root",
            os.geteuid() == 0,
            "yes" if os.geteuid() == 0 else "no: only runs as this process's own user are possible",
        )
    ]
    try:
        target = engine.resolve(user)
    except PipeforkError as exc:
        return [*checks, Check(f"user {user!r} allowed by policy", False, str(exc))]
    checks.append(Check(f"user {user!r} allowed by policy", True, f"uid {target.uid}, home {target.home}"))
    try:
        engine.forkserver.start()
        status = engine.forkserver.status()
    except PipeforkError as exc:
        return [*checks, Check("fork server starts", False, str(exc))]
    checks.append(
        Check(
            "fork server starts",
            True,
            f"pid {status['pid']}, preloaded {', '.join(status['preloaded'])}",
        )
    )
    result = engine.run_cell_as(user, PROBE, timeout=30)
    stdout = "".join(o["text"] for o in result.outputs if o.get("name") == "stdout")
    if result.status != "ok" or not stdout.strip():
        detail = (result.error or {}).get("evalue", result.status)
        return [*checks, Check(f"a run as {user!r}", False, detail)]
    checks.append(Check(f"a run as {user!r}", True, f"{result.duration * 1000:.1f} ms"))
    report = json.loads(stdout.strip().splitlines()[-1])
    checks.append(
        Check(
            "home directory usable by the user",
            report["home_ok"],
            report["home"] if report["home_ok"] else f"{report['home']} is missing or unreadable by {user!r}",
        )
    )
    unreadable = report["unreadable_paths"]
    checks.append(
        Check(
            "Python installation readable by the user",
            not unreadable and report["import_ok"],
            f"{engine.forkserver.python}"
            if not unreadable and report["import_ok"]
            else (
                f"{user!r} cannot read {', '.join(unreadable) or 'the standard library'}"
                f" ({report.get('import_error', 'imports beyond the preload list will fail')}). "
                "Install pipefork into a world-readable environment, e.g. "
                "/usr/bin/python3 -m venv /opt/pipefork && /opt/pipefork/bin/pip install pipefork, "
                "and run Jupyter from it."
            ),
        )
    )
    return checks


def doctor(user: str) -> int:
    """Print the report; the exit status is 0 only when every check passed."""
    engine = Engine()
    try:
        checks = run_checks(engine, user)
    finally:
        engine.close()
    width = max(len(c.name) for c in checks)
    for check in checks:
        print(f"{'OK  ' if check.ok else 'FAIL'}  {check.name:<{width}}  {check.detail}")
    failed = [c for c in checks if not c.ok]
    print("all checks passed" if not failed else f"{len(failed)} check(s) failed", file=sys.stderr)
    return 1 if failed else 0
