"""Output-path checks for the command-line tool: an output that cannot be written is an argument
error (exit 2, one line naming the flag and the path), found before any work starts."""
from __future__ import annotations

import os
from typing import Iterable


def _nearest_existing(path: str) -> str:
    """The closest ancestor of ``path`` (or ``path`` itself) that exists."""
    p = os.path.abspath(path)
    while not os.path.lexists(p):
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    return p


def check_out_dir(flag: str, path: str, files: Iterable[str] = ()) -> None:
    """ValueError unless ``path`` is a writable directory, or one that can be created (its
    nearest existing ancestor is a writable directory); ``files`` inside it, where they exist,
    must be writable regular files. Creates nothing."""
    if not path:
        raise ValueError(f"{flag} {path!r}: empty path")
    if os.path.lexists(path):
        if not os.path.isdir(path):
            raise ValueError(f"{flag} {path}: exists and is not a directory")
        if not os.access(path, os.W_OK | os.X_OK):
            raise ValueError(f"{flag} {path}: directory is not writable")
        for name in files:
            f = os.path.join(path, name)
            if os.path.lexists(f) and (not os.path.isfile(f) or not os.access(f, os.W_OK)):
                raise ValueError(f"{flag} {path}: {name} there exists and is not a writable file")
        return
    anc = _nearest_existing(path)
    if not os.path.isdir(anc):
        raise ValueError(f"{flag} {path}: cannot create it, {anc} is not a directory")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: cannot create it, {anc} is not writable")


def check_out_file(flag: str, path: str, hint: str = "") -> None:
    """ValueError unless ``path`` can be written as a file: not a directory, writable if it
    exists, else its directory exists and is writable. Creates nothing. ``hint`` ends the
    message."""
    def fail(reason):
        raise ValueError(f"{flag} {path}: {reason}{hint}")
    if not path:
        raise ValueError(f"{flag} {path!r}: empty path")
    if os.path.isdir(path):
        fail("is a directory")
    if os.path.lexists(path):
        if not os.access(path, os.W_OK):
            fail("file is not writable")
        return
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        anc = _nearest_existing(parent)
        fail(f"cannot write it, {anc} is not a directory" if not os.path.isdir(anc)
             else f"cannot write it, directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        fail(f"cannot write it, directory {parent} is not writable")


def makedirs(flag: str, path: str) -> None:
    """``os.makedirs(path, exist_ok=True)``, an OSError turned into the flag's ValueError."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot create it ({e.strerror or e})") from None
