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
    new_markdown_cell(
        "# Homework 1\nThis notebook belongs to its Unix owner, and its pipefork kernel runs as them."
    ),
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
        "# Running code as each student\n"
        "This notebook's kernel runs as root. `%%run_as` forks from pipefork's warm fork server, "
        "drops to the student (verified), runs the cell and streams its outputs back here. "
        "The students' own notebooks use the **Python 3 (pipefork)** kernel, which runs as the "
        "notebook's owner: open `students/pfdemo_ada/hw1.ipynb` and run it."
    ),
    new_code_cell("%load_ext pipefork_kernel"),
    new_code_cell(
        "%%run_as pfdemo_ada --timeout 30\n"
        "import getpass, time\n"
        "for i in range(3):\n"
        "    print(getpass.getuser(), 'tick', i, flush=True)\n"
        "    time.sleep(0.5)"
    ),
    new_code_cell(
        "%%run_as pfdemo_grace\n"
        "import matplotlib.pyplot as plt\n"
        "plt.plot([3, 1, 2]); plt.title('drawn as pfdemo_grace'); plt.show()"
    ),
    new_code_cell(
        "import glob, os, pwd\n"
        "import nbformat\n"
        "from pipefork_kernel import relay_output, run_cell_as\n\n"
        "# Grade every homework by running its code as its owner.\n"
        "for path in sorted(glob.glob('/srv/pipefork-demo/students/*/hw1.ipynb')):\n"
        "    owner = pwd.getpwuid(os.stat(path).st_uid).pw_name\n"
        "    notebook = nbformat.read(path, as_version=4)\n"
        "    code = '\\n'.join(c.source for c in notebook.cells if c.cell_type == 'code')\n"
        "    result = run_cell_as(owner, code, cwd=os.path.dirname(path), timeout=60)\n"
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
]


def write(path: str, cells: list, owner: str, kernel: str, display_name: str) -> None:
    entry = pwd.getpwnam(owner)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    os.chown(os.path.dirname(path), entry.pw_uid, entry.pw_gid)
    os.chmod(os.path.dirname(path), 0o755)
    notebook = new_notebook(cells=cells)
    notebook.metadata["kernelspec"] = {"name": kernel, "display_name": display_name, "language": "python"}
    nbformat.write(notebook, path)
    os.chown(path, entry.pw_uid, entry.pw_gid)
    os.chmod(path, 0o644)


def main(tree: str, users: list[str]) -> None:
    os.makedirs(tree, exist_ok=True)
    os.chmod(tree, 0o755)
    for user in users:
        path = os.path.join(tree, "students", user, "hw1.ipynb")
        write(path, STUDENT_CELLS, user, "pipefork", "Python 3 (pipefork)")
    write(os.path.join(tree, "admin", "grade.ipynb"), ADMIN_CELLS, "root", "python3", "Python 3 (ipykernel)")
    print(f"demo tree ready in {tree}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
