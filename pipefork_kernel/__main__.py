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
    install_parser = commands.add_parser("install", help='install the "Python 3 (pipefork)" kernelspec')
    where = install_parser.add_mutually_exclusive_group()
    where.add_argument("--user", action="store_true", help="for this user only (~/.local/share/jupyter)")
    where.add_argument("--sys-prefix", action="store_true", help="into this environment (sys.prefix)")
    where.add_argument("--prefix", help="under this prefix (PREFIX/share/jupyter/kernels)")
    args = parser.parse_args(argv)
    if args.command == "doctor":
        from .doctor import doctor

        return doctor(args.user)
    from .kernelspec import install

    prefix = sys.prefix if args.sys_prefix else args.prefix
    print(f"installed the pipefork kernelspec in {install(user=args.user, prefix=prefix)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
