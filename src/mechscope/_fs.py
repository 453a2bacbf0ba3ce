"""File modes: what mechscope writes gets the modes the user's umask gives, never owner-only.

``tempfile.mkdtemp`` always makes 0700 folders and ``safetensors`` writes 0600 files; every
folder mechscope assembles under a temporary name (trace folders, the weight cache, zoo
checkpoints, store tensor files) goes through :func:`apply_umask` before it is renamed into place.

>>> import tempfile, pathlib
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> apply_umask(d)
>>> oct(d.stat().st_mode & 0o777) == oct(0o777 & ~current_umask())
True
"""

from __future__ import annotations

import os
from pathlib import Path


def current_umask() -> int:
    """The process's umask (read without changing it where ``/proc`` allows)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: Path) -> None:
    """Give ``path`` (a file, or a folder and everything under it) the modes the user's umask
    gives new folders (``0o777 & ~umask``) and files (``0o666 & ~umask``)."""
    mask = current_umask()
    for p in (path, *path.rglob("*")) if path.is_dir() else (path,):
        if not p.is_symlink():
            p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)
