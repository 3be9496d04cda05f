"""File access for a root server that does not follow links its users can plant.

Jupyter's file manager opens paths as the server's user.  On a root server a
student can make ``link.txt`` (or ``.ipynb_checkpoints``) a symbolic link to a
root-only file, then ask for it to be read or saved: root would follow the
link.  This manager refuses any path that goes through a symbolic link below
``root_dir``, for files and for checkpoints.

A student who swaps a file for a link between this check and the open can
still win that race; the complete fix is to do file I/O as the file's owner.
"""

from __future__ import annotations

import os
import stat
import tempfile

from jupyter_server.services.contents.filecheckpoints import AsyncFileCheckpoints
from jupyter_server.services.contents.largefilemanager import AsyncLargeFileManager
from tornado.web import HTTPError
from traitlets import default


def refuse_links(base: str, os_path: str, api_path: str) -> None:
    """403 if a component of ``os_path`` below ``base`` is a symbolic link."""
    base = os.path.abspath(base)
    relative = os.path.relpath(os.path.abspath(os_path), base)
    if relative.startswith(os.pardir):
        return
    current = base
    for part in relative.split(os.sep):
        if part in ("", os.curdir):
            continue
        current = os.path.join(current, part)
        try:
            mode = os.lstat(current).st_mode
        except FileNotFoundError:
            return
        if stat.S_ISLNK(mode):
            raise HTTPError(
                403,
                f"{api_path!r} goes through a symbolic link ({part!r}); this server runs as root "
                "and does not follow links its users can plant",
            )


class NoFollowFileCheckpoints(AsyncFileCheckpoints):
    """Checkpoints that refuse a linked ``.ipynb_checkpoints`` (or a linked checkpoint)."""

    def _get_os_path(self, path: str) -> str:
        os_path = super()._get_os_path(path)
        refuse_links(self.root_dir, os_path, path)
        return os_path

    def checkpoint_path(self, checkpoint_id: str, path: str) -> str:
        checkpoint = super().checkpoint_path(checkpoint_id, path)
        fallback = os.path.join(tempfile.gettempdir(), "jupyter_checkpoints")
        base = self.root_dir if not checkpoint.startswith(fallback + os.sep) else fallback
        refuse_links(base, checkpoint, path)
        return checkpoint


class NoFollowContentsManager(AsyncLargeFileManager):
    """Jupyter's default file manager, minus following symbolic links below root_dir."""

    @default("checkpoints_class")
    def _default_checkpoints_class(self) -> type:
        return NoFollowFileCheckpoints

    def _get_os_path(self, path: str) -> str:
        os_path = super()._get_os_path(path)
        refuse_links(self.root_dir, os_path, path)
        return os_path
