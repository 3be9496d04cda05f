"""``%%run_as`` and ``%run_as``: run one cell or statement as another Unix user.

Load with ``%load_ext pipefork_kernel``.  The run forks from pipefork's fork
server (never from this kernel, which runs threads); outputs appear in the
cell as they are produced, sanitized unless ``--trust-output`` is given.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
from IPython.display import clear_output, publish_display_data

from . import get_engine
from .client import RunClient
from .errors import PipeforkError, RemoteError
from .untrusted import sanitize_output
from .users import current_user

#: Options of the line form that take a value (they precede USER).
VALUE_OPTIONS = ("--timeout", "--cwd", "--push", "--pull")


class RemoteValue:
    """The value of the remote cell's last expression, displayed as this cell's result."""

    def __init__(self, data: dict[str, Any], metadata: dict[str, Any]):
        self.data = data
        self.metadata = metadata

    def _repr_mimebundle_(self, include=None, exclude=None):
        return self.data, self.metadata

    def __repr__(self) -> str:
        return self.data.get("text/plain", "<remote value>")


def split_line_form(line: str) -> tuple[str, str]:
    """``[options] USER statement`` → (``options USER``, ``statement``)."""
    rest = line.strip()
    head: list[str] = []
    while rest.startswith("-"):
        token, _, rest = rest.partition(" ")
        rest = rest.lstrip()
        head.append(token)
        if token in VALUE_OPTIONS:
            value, _, rest = rest.partition(" ")
            rest = rest.lstrip()
            head.append(value)
    user, _, statement = rest.partition(" ")
    head.append(user)
    return " ".join(head), statement.strip()


def _names(option: str) -> list[str]:
    names = [name.strip() for name in option.split(",") if name.strip()]
    bad = [name for name in names if not name.isidentifier()]
    if bad:
        raise UsageError(f"not variable names: {', '.join(bad)} (use --push a,b / --pull x,y)")
    return names


@magics_class
class RunAsMagics(Magics):
    @magic_arguments()
    @argument("user", help="the Unix user to run as")
    @argument("--timeout", type=float, default=None, help="seconds before the run is killed")
    @argument("--cwd", default=None, help="working directory of the run (default: the user's home)")
    @argument("--push", default="", metavar="A,B", help="variables to send to the run (dill)")
    @argument("--pull", default="", metavar="X,Y", help="variables to bring back (JSON values only)")
    @argument(
        "--trust-output",
        action="store_true",
        help="show JavaScript and unsanitized HTML from the run (only for code you trust)",
    )
    @line_cell_magic
    def run_as(self, line: str, cell: str | None = None) -> Any:
        """Run this cell (or a statement) once as another Unix user.

        Usage::

            %%run_as student1 --timeout 30
            import getpass
            print(getpass.getuser())

            %run_as student1 import os; print(os.getuid())

            %%run_as student1 --push data --pull score
            score = sum(data) / len(data)

        The cell runs in a fresh IPython shell in a process forked from
        pipefork's fork server, as USER (the drop to USER is verified). Output
        streams into this cell while it runs; the stop button ends the run.
        Nothing but ``--pull`` variables comes back, and only as JSON.

        Output from another user's code is untrusted: only text, images, JSON,
        sanitized HTML and escaped Markdown are shown. JavaScript, SVG and raw
        HTML need ``--trust-output``.

        Running as another user needs this kernel to run as root, or a
        pipefork server to send the cell to: set PIPEFORK_URL (the server's
        base URL) and PIPEFORK_TOKEN, and the server's policy decides.
        """
        if cell is None:
            options, code = split_line_form(line)
            if not code:
                raise UsageError("give a statement after the user: %run_as USER statement")
        else:
            options, code = line, cell
        args = parse_argstring(self.run_as, options)
        push_names, pull_names = _names(args.push), _names(args.pull)
        missing = [name for name in push_names if name not in self.shell.user_ns]
        if missing:
            raise UsageError(f"cannot push {', '.join(missing)}: not defined in this notebook")
        push = {name: self.shell.user_ns[name] for name in push_names}
        return self._run(args.user, code, args, push, pull_names)

    def _run(self, user: str, code: str, args: Any, push: dict[str, Any], pull: list[str]) -> Any:
        shown: dict[str, Any] = {}

        def show(output: dict[str, Any]) -> None:
            output = sanitize_output(output, trust=args.trust_output)
            kind = output["output_type"]
            if kind == "stream":
                stream = sys.stderr if output["name"] == "stderr" else sys.stdout
                stream.write(output["text"])
                stream.flush()
            elif kind == "clear_output":
                clear_output(wait=output["wait"])
            elif kind in ("display_data", "update_display_data"):
                publish_display_data(
                    output["data"],
                    output["metadata"],
                    transient=output.get("transient"),
                    update=kind == "update_display_data",
                )
            elif kind == "execute_result":
                shown["value"] = RemoteValue(output["data"], output["metadata"])

        client = RunClient.from_environment() if os.geteuid() != 0 else None
        if client is not None and user != current_user().name:
            if push or pull:
                raise UsageError("--push and --pull need a root kernel; the REST API carries code only")
            result = client.run_cell(code, user=user, timeout=args.timeout, cwd=args.cwd, on_output=show)
        else:
            result = get_engine().run_cell_as(
                user, code, timeout=args.timeout, cwd=args.cwd, on_output=show, push=push, pull=pull
            )
        if pull and result.result:
            self.shell.user_ns.update(result.result["values"])
        if result.status != "ok":
            error = result.error or {"ename": result.status, "evalue": "", "traceback": []}
            if result.status == "timeout":
                error = {
                    "ename": "RunTimeout",
                    "evalue": f"the run as {user!r} passed its {args.timeout or 'default'} s timeout "
                    "and was killed; raise --timeout",
                    "traceback": [],
                }
            raise RemoteError(error["ename"], error["evalue"], error["traceback"], user)
        if pull and result.result:
            problems = []
            if result.result["missing"]:
                problems.append(f"not defined after the cell ran: {', '.join(result.result['missing'])}")
            if result.result["not_json"]:
                kinds = ", ".join(f"{k} ({v})" for k, v in result.result["not_json"].items())
                problems.append(f"not JSON-compatible, so not pulled: {kinds}")
            if problems:
                raise PipeforkError("--pull: " + "; ".join(problems))
        return shown.get("value")
