"""The ``pipefork`` command line (``python -m pipefork_kernel``)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="pipefork", description="Run Jupyter code as each person's own Unix user."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    doctor_parser = commands.add_parser(
        "doctor", help="check that runs as a user can work on this machine, and say how to fix what can't"
    )
    doctor_parser.add_argument("--user", required=True, help="the Unix user runs would become")
    args = parser.parse_args(argv)
    if args.command == "doctor":
        from .doctor import doctor

        return doctor(args.user)
    return 2


if __name__ == "__main__":
    sys.exit(main())
