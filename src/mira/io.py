"""Atomic file writes: write to a temp file in the same folder, fsync, then rename.

A crash or a kill at any moment leaves either the old file or the new one, never a
half-written one. Folders are replaced the same way (``atomic_dir``, ``replace_dir``):
built beside their target, then swapped in so that the old folder or the new one always
exists under a known name.

Temp names carry the writer's process id: ``.<name>.<pid>-<random>.tmp`` for files,
``.<name>.<pid>-<random>.tmpdir`` for folders, ``.<name>.old-<pid>`` for a folder being
replaced. ``clean_temp`` removes the ones a killed process left behind, and
``recover_dir`` finishes or undoes a swap that a kill interrupted. Files and folders
written here get the usual permissions for the process's umask (``0o666 & ~umask``,
``0o777 & ~umask``), not ``mkstemp``'s private 0600/0700.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger("mira")
_TEMP = re.compile(r"^\..+\.(?:(\d+)-)?[^.]*\.(tmp|tmpdir)$")  # .<name>.<pid>-<random>.tmp[dir]


def current_umask() -> int:
    """The process's umask (read from /proc where possible: setting it to read it is racy)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class _Writer:
    """A file that remembers the ``OSError`` its ``write`` raised: ``torch.save`` turns that one into
    ``RuntimeError: [enforce fail ...] unexpected pos``, and a full disk should read as a full disk."""

    def __init__(self, f):
        self._f, self.error = f, None

    def write(self, data):
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def __getattr__(self, name):
        return getattr(self._f, name)


_KILLS: dict[tuple[str, str], int] = {}


def _test_kill(stage: str, path: Path) -> None:
    """Test hook for the kill tests (``tests/core/test_kills.py``): with ``MIRA_TEST_KILL_AT=STAGE:NAME:N``
    this process SIGKILLs itself at ``STAGE`` of its N-th atomic write of a file called ``NAME``:
    ``write`` when the temp file is written and fsynced but not yet renamed, ``rename`` right after
    the rename (e.g. ``write:checkpoint.pt:2``: in the middle of the second checkpoint)."""
    spec = os.environ.get("MIRA_TEST_KILL_AT")
    if not spec:
        return
    want, _, rest = spec.partition(":")
    name, _, n = rest.rpartition(":")
    if want != stage or name != path.name:
        return
    _KILLS[stage, name] = count = _KILLS.get((stage, name), 0) + 1
    if str(count) == n.strip():
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


@contextlib.contextmanager
def _atomic_file(path: str | os.PathLike):
    """Yield a binary file in ``path``'s folder; on success fsync it and rename it to ``path``.
    An ``OSError`` that a write raised (``ENOSPC``: the disk is full) is raised as itself, whatever
    the writer made of it; the temp file is removed and ``path`` keeps its old content."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}-", suffix=".tmp", dir=path.parent)
    writer = None
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes it 0600
        with os.fdopen(fd, "wb") as f:
            writer = _Writer(f)
            yield writer
            f.flush()
            os.fsync(f.fileno())
        _test_kill("write", path)
        os.replace(tmp, path)
        _test_kill("rename", path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        err = writer.error if writer is not None and writer.error is not None else e
        if isinstance(err, OSError) and err.filename is None and err.errno is not None:
            raise OSError(err.errno, err.strerror, str(path)) from None  # say which file
        if err is not e:
            raise err from None
        raise


def make_temp_dir(path: str | os.PathLike) -> Path:
    """A new empty folder beside ``path`` (``.<name>.<pid>-<random>.tmpdir``), with umask permissions."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}-", suffix=".tmpdir", dir=path.parent))
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it 0700
    return tmp


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike):
    """Yield a temp folder beside ``path``; on success it replaces ``path`` (``replace_dir``).

    On an error the temp folder is deleted and ``path`` is left as it was. A kill at any
    moment leaves ``path`` (old or new) or, between the two renames of the swap, the old
    folder as ``.<name>.old-<pid>``, which the next ``atomic_dir``/``recover_dir`` on
    ``path`` puts back.
    """
    path = Path(path)
    recover_dir(path)
    _remove_stale_siblings(path)
    tmp = make_temp_dir(path)
    try:
        yield tmp
        replace_dir(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _rename(src: Path, dst: Path) -> None:
    os.replace(src, dst)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _old_name(path: Path, pid: int | None = None) -> Path:
    return path.parent / f".{path.name}.old-{os.getpid() if pid is None else pid}"


def apply_umask(root: str | os.PathLike) -> None:
    """Give ``root`` and everything in it the permissions of a file or folder created under the
    current umask (files ``0o666 & ~umask``, keeping execute bits; folders ``0o777 & ~umask``).
    Writers such as ``mkdtemp`` and safetensors create theirs private (0700/0600)."""
    mask = current_umask()
    for dirpath, _, filenames in os.walk(root):
        os.chmod(dirpath, 0o777 & ~mask)
        for name in filenames:
            f = os.path.join(dirpath, name)
            if not os.path.islink(f):
                os.chmod(f, (0o666 | (os.stat(f).st_mode & 0o111)) & ~mask)


def replace_dir(new: str | os.PathLike, path: str | os.PathLike) -> None:
    """Move the folder ``new`` to ``path``, replacing whatever ``path`` holds, so that one of the two
    always exists: (1) rename ``path`` to ``.<name>.old-<pid>``, (2) rename ``new`` to ``path``,
    (3) delete the old one. An error in (2) renames the old one back; a kill between (1) and (2)
    leaves the old one, which ``recover_dir(path)`` restores; a kill in (3) leaves a stale old
    one, which ``recover_dir`` deletes. ``new`` gets umask permissions first (``apply_umask``).
    """
    new, path = Path(new), Path(path)
    apply_umask(new)
    recover_dir(path)  # an earlier swap's leftover first: never delete the only copy
    if not (path.exists() or path.is_symlink()):
        _rename(new, path)
        return
    old = _old_name(path)
    _rename(path, old)
    try:
        _rename(new, path)
    except BaseException:
        if not path.exists():
            with contextlib.suppress(OSError):
                _rename(old, path)
        raise
    _remove(old)


def _pid_alive(pid: int, self_alive: bool = True) -> bool:
    if pid == os.getpid():
        return self_alive
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True
    return True


def recover_dir(path: str | os.PathLike) -> Path | None:
    """Finish or undo a ``replace_dir`` of ``path`` that a killed process left half done.

    When ``path`` is missing and a ``.<name>.old-<pid>`` of a process that no longer runs is
    there, it is renamed back to ``path`` (and returned); when ``path`` exists, such
    leftovers are deleted. Returns the restored folder, or None.
    """
    path = Path(path)
    if not path.parent.is_dir():
        return None
    prefix = f".{path.name}.old-"
    olds = []
    for entry in path.parent.iterdir():
        if entry.name.startswith(prefix) and entry.name[len(prefix):].isdigit():
            # this process's own old folder is a leftover too: its swap has ended (single writer per path)
            if not _pid_alive(int(entry.name[len(prefix):]), self_alive=False):
                olds.append(entry)
    if not olds:
        return None
    olds.sort(key=lambda p: p.stat().st_mtime)
    restored = None
    if not (path.exists() or path.is_symlink()):
        restored = olds.pop()
        _rename(restored, path)
        log.warning("restored %s from an interrupted replace (%s)", path, restored.name)
    for old in olds:
        _remove(old)
    return restored


def _is_stale_temp(name: str) -> bool:
    m = _TEMP.match(name)
    return bool(m) and (m.group(1) is None or not _pid_alive(int(m.group(1))))


def _remove_stale_siblings(path: Path) -> None:
    """Delete temp files and folders for ``path`` left beside it by killed processes."""
    if not path.parent.is_dir():
        return
    prefix = f".{path.name}."
    for entry in path.parent.iterdir():
        if entry.name.startswith(prefix) and _is_stale_temp(entry.name):
            with contextlib.suppress(OSError):
                _remove(entry)


def clean_temp(root: str | os.PathLike) -> list[Path]:
    """Delete, anywhere under ``root``, the temp files and folders of atomic writes that a killed
    process left (``.*.tmp``, ``.*.tmpdir`` of processes no longer running), and undo or finish
    interrupted folder swaps (``recover_dir``). Returns what was removed."""
    root = Path(root)
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    recover_dir(root)
    for dirpath, dirnames, _ in os.walk(root):
        here = Path(dirpath)
        for name in dirnames:
            if name.startswith(".") and ".old-" in name:
                recover_dir(here / name[1:name.rindex(".old-")])
        entries = list(os.scandir(here))  # again: recover_dir may have renamed some
        dirnames[:] = []
        for entry in entries:
            if _is_stale_temp(entry.name):
                with contextlib.suppress(OSError):
                    _remove(here / entry.name)
                    removed.append(here / entry.name)
            elif entry.is_dir(follow_symlinks=False):
                dirnames.append(entry.name)
    return removed


def clear_if_only_temp(path: str | os.PathLike) -> bool:
    """Empty a folder that holds nothing but temp files or folders of killed writers (with their
    pid: a run killed while it wrote its first file), so that it counts as empty. True if it did."""
    path = Path(path)
    if not path.is_dir() or path.is_symlink():
        return False
    entries = list(path.iterdir())
    stale = [e for e in entries if (m := _TEMP.match(e.name)) and m.group(1) and not _pid_alive(int(m.group(1)))]
    if not entries or len(stale) != len(entries):
        return False
    for e in stale:
        with contextlib.suppress(OSError):
            _remove(e)
    return True


def is_empty_dir(path: str | os.PathLike) -> bool:
    """``path`` does not exist, or is a folder with nothing in it."""
    path = Path(path)
    if not (path.exists() or path.is_symlink()):
        return True
    return path.is_dir() and not any(path.iterdir())


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with _atomic_file(path) as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=_default) + "\n")


def atomic_torch_save(path: str | os.PathLike, obj: Any) -> None:
    """``torch.save`` straight into a temp file (no in-memory copy of the state), then rename."""
    import torch

    with _atomic_file(path) as f:
        torch.save(obj, f)


def atomic_save_npy(path: str | os.PathLike, array) -> None:
    import numpy as np

    buf = io.BytesIO()
    np.save(buf, array)
    atomic_write_bytes(path, buf.getvalue())


def _default(o: Any):
    import numpy as np

    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o)}")
