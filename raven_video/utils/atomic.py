"""Atomic writes: a file or a folder appears complete or not at all (a crash mid-write leaves the old one)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

__all__ = ["atomic_write_text", "atomic_folder"]


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to a temporary file next to ``path``, then rename it onto ``path``."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_folder(output_dir: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary folder next to ``output_dir`` to fill; on success it replaces ``output_dir`` (the old one is
    kept until the new one is in place), on any error it is deleted and ``output_dir`` is left as it was."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not overwrite:
        raise FileExistsError(f"{output_dir} already exists; choose another folder or overwrite it.")
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    backup = None
    try:
        yield tmp_dir
        if output_dir.exists():
            backup = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.old-", dir=output_dir.parent))
            os.rmdir(backup)
            os.rename(output_dir, backup)
        os.rename(tmp_dir, output_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        if backup is not None and backup.exists() and not output_dir.exists():
            os.rename(backup, output_dir)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)
