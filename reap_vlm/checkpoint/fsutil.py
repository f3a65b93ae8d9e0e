"""Writes that never leave a half-finished result looking complete."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import ReapError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_output_dir(path: Path, force: bool = False, source: Path | None = None) -> Iterator[Path]:
    """Yield a temporary sibling folder; rename it to ``path`` only when the block succeeds.

    An existing ``path`` is refused unless ``force``; ``source`` (an input folder) may never be
    the output.  On failure the temporary folder is removed and ``path`` is untouched.
    """
    path = Path(path)
    if source is not None and path.resolve() == Path(source).resolve():
        raise ReapError(f"output folder {path} is the source folder; choose another output "
                        "(the source is never written)")
    if path.exists() and not force:
        raise ReapError(f"output {path} already exists; pass --force to replace it or choose another folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; the result is shared like any folder
    try:
        yield tmp
        _sync_tree(tmp)  # every file (copied ones too) is on disk before the name says "complete"
        if path.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, trash / "old")
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(trash / "old", path)  # the old output back where it was
                trash.rmdir()
                raise
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            if not os.path.islink(os.path.join(folder, name)):
                _fsync(Path(folder, name))
        _fsync(Path(folder))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save(path: Path, save: Callable[[Path], None]) -> Path:
    """``save(tmp)`` into a temporary file of a unique name beside ``path`` (same suffix, for writers that go by
    it), renamed to ``path`` when complete; two writers never share a temporary file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())
    try:
        save(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode())


def read_text(path: Path, what: str) -> str:
    """A text file as UTF-8 (a BOM dropped); a missing, unreadable or non-UTF-8 file is one line naming the file
    and where the bad byte is.  Every text file the scripts read comes through here."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ReapError(f"{what} not found: {path}") from None
    except OSError as exc:
        raise ReapError(f"cannot read {what} {path} ({exc.strerror or exc})") from None
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ReapError(f"{what} {path} is not UTF-8 text (byte 0x{data[exc.start]:02x} at line {line}, column "
                        f"{column}); save it as UTF-8") from None


def parse_json(text: str, path: Path, what: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ReapError(f"{what} {path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); "
                        "fix or regenerate it") from None
    except RecursionError:
        raise ReapError(f"{what} {path} is nested too deeply to be read; fix or regenerate it") from None


def read_json(path: Path, what: str, expect: type | None = None) -> Any:
    """A JSON file through ``read_text``; ``expect`` (dict, list): the type its top level must have."""
    value = parse_json(read_text(path, what), Path(path), what)
    if expect is not None and not isinstance(value, expect):
        kind = {dict: "an object", list: "a list"}.get(expect, expect.__name__)
        raise ReapError(f"{what} {path}: expected a JSON {kind} at the top level, found {json_type(value)}; "
                        "fix or regenerate it")
    return value


def json_type(value: Any) -> str:
    names = {dict: "object", list: "list", str: "string", bool: "boolean", int: "integer", float: "number",
             type(None): "null"}
    return names.get(type(value), type(value).__name__)
