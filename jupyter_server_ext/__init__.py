"""pipefork's Jupyter Server extension: the root-launched broker.

Enabled on install by ``jupyter-config/jupyter_server_config.d/jupyter_server_ext.json``.
"""

from __future__ import annotations

from typing import Any


def _jupyter_server_extension_points() -> list[dict[str, Any]]:
    from .app import PipeforkApp

    return [{"module": "jupyter_server_ext", "app": PipeforkApp}]
