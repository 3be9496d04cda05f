"""Write the demo tree: one notebook per demo user, owned by them, and the admin's.

Usage: demo_tree.py TREE USER [USER ...]
"""

from __future__ import annotations

import os
import pwd
import sys

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

STUDENT_CELLS = [
    new_markdown_cell("# Homework 1\nThis notebook belongs to its Unix owner; the admin runs it as them."),
    new_code_cell("import getpass, os\nprint('I am', getpass.getuser(), 'with uid', os.getuid())"),
    new_code_cell(
        "import matplotlib.pyplot as plt\n"
        "plt.plot([1, 4, 9, 16], marker='o')\n"
        "plt.title(f'{getpass.getuser()} squares')\nplt.show()"
    ),
    new_code_cell(
        "result = os.path.expanduser('~/hw1-result.txt')\n"
        "open(result, 'w').write('done\\n')\n"
        "print(result, 'is owned by uid', os.stat(result).st_uid)"
    ),
]

ADMIN_CELLS = [
    new_markdown_cell(
        "# Grading as each student\n"
        "This kernel runs as root. `run_cell_as` forks from pipefork's warm fork server, drops to the "
        "notebook's owner (verified), runs the code and streams its outputs back here. "
        "Nothing a student's code does runs as root."
    ),
    new_code_cell(
        "import glob, os, pwd\n"
        "import nbformat\n"
        "from pipefork_kernel import relay_output, run_cell_as\n\n"
        "for path in sorted(glob.glob('/srv/pipefork-demo/students/*/hw1.ipynb')):\n"
        "    owner = pwd.getpwuid(os.stat(path).st_uid).pw_name\n"
        "    notebook = nbformat.read(path, as_version=4)\n"
        "    code = '\\n'.join(c.source for c in notebook.cells if c.cell_type == 'code')\n"
        "    print(f'--- {path} as {owner}')\n"
        "    result = run_cell_as(\n"
        "        owner, code, cwd=os.path.dirname(path), timeout=60, on_output=relay_output\n"
        "    )\n"
        "    print(f'{owner}: {result.status} in {result.duration * 1000:.0f} ms')"
    ),
    new_code_cell(
        "from pipefork_kernel import run_as\n\n"
        "def peek(path):\n"
        "    try:\n"
        "        return open(path).read()[:40]\n"
        "    except OSError as exc:\n"
        "        return f'refused: {exc}'\n\n"
        "run_as('pfdemo_ada', peek, args=('/etc/shadow',))"
    ),
    new_code_cell(
        "from pipefork_kernel import RunTimeout\n\n"
        "def slow():\n"
        "    import time\n"
        "    for i in range(3):\n"
        "        print('tick', i, flush=True)\n"
        "        time.sleep(1)\n"
        "    while True:\n"
        "        pass\n\n"
        "try:\n"
        "    run_as('pfdemo_grace', slow, timeout=5)\n"
        "except RunTimeout as exc:\n"
        "    print('stopped:', exc)"
    ),
]


def write(path: str, cells: list, owner: str) -> None:
    entry = pwd.getpwnam(owner)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    os.chown(os.path.dirname(path), entry.pw_uid, entry.pw_gid)
    os.chmod(os.path.dirname(path), 0o755)
    notebook = new_notebook(cells=cells)
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(notebook, path)
    os.chown(path, entry.pw_uid, entry.pw_gid)
    os.chmod(path, 0o644)


def main(tree: str, users: list[str]) -> None:
    os.makedirs(tree, exist_ok=True)
    os.chmod(tree, 0o755)
    for user in users:
        write(os.path.join(tree, "students", user, "hw1.ipynb"), STUDENT_CELLS, user)
    write(os.path.join(tree, "admin", "grade.ipynb"), ADMIN_CELLS, "root")
    print(f"demo tree ready in {tree}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
