"""Every script's output folder, checked before any model is loaded: writable (a probe file created and removed),
not inside a source model folder, enough free disk; and one writer at a time (a lock file beside it)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import ConfigError, ReapError

DISK_MARGIN = 64 << 20  # headers, config, filesystem slack


def existing_ancestor(path: Path) -> Path:
    folder = Path(path).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def check_free_space(output: Path, needed: int, what: str, flag: str = "--output", hint: str = "") -> None:
    folder = existing_ancestor(Path(output).absolute().parent)
    free = shutil.disk_usage(folder).free
    if free < needed + DISK_MARGIN:
        raise ReapError(f"not enough disk space in {folder}: {what} needs {(needed + DISK_MARGIN) / 1e9:.2f} GB, "
                        f"{free / 1e9:.2f} GB are free; free some space or choose another {flag}{hint}")


def check_output_folder(output: Path, flag: str, sources: dict[str, Path | None], needed: int = 0,
                        what: str = "the output") -> None:
    """Refuse, before anything is loaded or written, an output folder that is a file, cannot be written, lies in
    (or is) a source folder, or whose disk lacks ``needed`` bytes.  Nothing is left behind."""
    output = Path(output)
    where = output.resolve()
    for name, source in sources.items():
        if source is None:
            continue
        source = Path(source).resolve()
        if where == source or source in where.parents:
            raise ConfigError(f"{flag}={output} is {'' if where == source else 'inside '}the {name} {source}; "
                              "choose an output folder outside it (a model folder is never written)")
    if output.exists() and not output.is_dir():
        raise ConfigError(f"{flag}={output} is a file, not a folder; choose an output folder")
    check_writable(output, flag)
    check_free_space(output, needed, what, flag)


def check_writable(output: Path, flag: str) -> None:
    """A probe file created and removed where ``output`` is (or will be made)."""
    folder = existing_ancestor(output)
    if not folder.is_dir():
        raise ConfigError(f"{flag}={output}: {folder} is a file, not a folder; choose an output folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".reap-write-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ReapError(f"{flag}={output}: cannot write in {folder} ({exc.strerror or exc}); choose a writable "
                        "output folder") from None


def lock_path(output: Path) -> Path:
    output = Path(output).absolute()
    return output.parent / f".{output.name}.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def output_lock(output: Path, flag: str) -> Iterator[None]:
    """Hold ``.<name>.lock`` beside ``output`` (pid and host) for the block: a second run into the same folder is
    refused with a clear message; a lock left by a dead process on this host is taken over."""
    path = lock_path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                owner = json.loads(path.read_text(encoding="utf-8"))
                pid, host = int(owner["pid"]), str(owner["host"])
            except (OSError, ValueError, KeyError, TypeError):
                owner, pid, host = {}, None, None
            if host == me["host"] and pid is not None and not _alive(pid):
                path.unlink(missing_ok=True)  # its owner died without cleaning up
                continue
            who = f"pid {pid} on {host}, since {owner.get('since')}" if pid is not None else "an unreadable lock"
            raise ReapError(f"{flag}={output} is in use by another run ({who}); wait for it to finish or choose "
                            f"another output folder (if no such run exists, delete {path})") from None
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(me, handle)
        break
    else:
        raise ReapError(f"cannot take the lock {path}; delete it if no other run is writing to {output}")
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
