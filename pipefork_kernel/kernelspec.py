"""Installing the "Python 3 (pipefork)" kernelspec (name ``pipefork``).

``pip install`` already places it in ``{sys.prefix}/share/jupyter/kernels``;
this installs it elsewhere (``--user``, ``--prefix``) the way
``python -m ipykernel install`` does.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from jupyter_client.kernelspec import KernelSpecManager

KERNEL_NAME = "pipefork"
SPEC_FILE = os.path.join(os.path.dirname(__file__), "resources", "kernel.json")


def install(user: bool = False, prefix: str | None = None) -> str:
    """Install the kernelspec; returns the directory it was installed into."""
    with tempfile.TemporaryDirectory() as source:
        os.chmod(source, 0o755)
        shutil.copy(SPEC_FILE, os.path.join(source, "kernel.json"))
        return KernelSpecManager().install_kernel_spec(source, KERNEL_NAME, user=user, prefix=prefix)
