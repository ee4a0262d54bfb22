"""Writes that a kill cannot leave half done: a temporary file or folder beside the target, then a rename.

A rename within one folder is atomic on POSIX, so a reader (`dvc metrics diff`, a resumed stage, the
next stage) sees the old content or the new, never a truncated JSON or a folder with half its files.
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def write_text_atomic(path: Path, text: str) -> Path:
    """`path.write_text(text)`, all or nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with temporary.open("w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        temporary.replace(path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


@contextmanager
def replace_folder(folder: Path) -> Iterator[Path]:
    """Yield an empty temporary folder to fill; when the block ends without error it replaces `folder`.

    A kill inside the block leaves the old `folder` (or none) and a stray `.<name>.tmp-<pid>` that the
    next call removes. The swap itself is two renames: a kill between them leaves no `folder` at all,
    never a mixed one, and DVC reruns the stage.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    for stray in folder.parent.glob(f".{folder.name}.tmp-*"):
        shutil.rmtree(stray, ignore_errors=True)
    for stray in folder.parent.glob(f".{folder.name}.old-*"):
        shutil.rmtree(stray, ignore_errors=True)
    temporary = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    temporary.mkdir()
    try:
        yield temporary
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            folder.rename(old)
            temporary.rename(folder)
            shutil.rmtree(old)
        else:
            temporary.rename(folder)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
