"""Safe output files: never overwrite an input, never leave a partial output or litter behind.

Every command that writes a model writes through :func:`atomic_output`, the one writer that
owns temporaries:

* The output ``OUT`` and its sidecars (ONNX external data ``OUT.data``) are written into a
  hidden folder beside it, ``.OUT.fc2conv-<pid>-<random>.tmp``; on success the sidecars and
  then ``OUT`` are moved into place with ``os.replace`` (atomic on POSIX) and the folder is
  removed. A reader sees the old output or the new one, never a half-written one.
* On any error, Ctrl-C (SIGINT), SIGTERM or SIGHUP the folder is removed; a signal becomes
  :class:`~fc2conv.errors.Interrupted`, which the CLI turns into one line and exit 128+signum.
  From the rename of ``OUT`` on (the commit) a signal no longer stops the write: it waits for
  the folder's removal and then reaches the handler that was there before (by default it ends
  the process), so "stopped" always means "nothing written".
* A run killed with SIGKILL cannot clean up. The writer's pid is in the folder's name, so the
  next run writing the same output removes folders whose writer is no longer alive, saying so
  in one log line.
* A short write (disk full, quota, ``ulimit -f``) becomes one :class:`Fc2ConvError`:
  ``could not write OUT: no space left (N of M bytes written); nothing was written``.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import secrets
import shutil
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

from fc2conv.errors import Fc2ConvError, Interrupted

log = logging.getLogger(__name__)

TEMP_TAG = "fc2conv"
_TEMP_RE = re.compile(rf"^\.(?P<name>.+)\.{TEMP_TAG}-(?P<pid>\d+)-[0-9a-f]+\.tmp$")
NO_SPACE = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
# BufferedWriter / numpy report a short write as "N requested and M written" with no errno.
_SHORT_WRITE = re.compile(r"(\d+) requested and (\d+) written")
SIGNALS = tuple(
    s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if s
)


def check_output_path(
    in_path: str | os.PathLike[str], out_path: str | os.PathLike[str], *, in_place: bool = False
) -> Path:
    """Refuse to write over the input unless ``in_place``; return the output path.

    Also refuses an output folder that does not exist and an output path that is a folder.
    """
    src, dst = Path(in_path), Path(out_path)
    same = dst.exists() and src.exists() and os.path.samefile(src, dst)
    if same and not in_place:
        raise Fc2ConvError(
            f"refusing to overwrite the input file {src}; choose another output path or pass "
            f"--in-place (written to a temporary file, then atomically replaced)"
        )
    if not dst.parent.exists():
        raise Fc2ConvError(f"the output folder {dst.parent} does not exist")
    if dst.is_dir():
        raise Fc2ConvError(f"the output path {dst} is a folder; give a file name")
    return dst


def temporaries(path: str | os.PathLike[str]) -> list[tuple[Path, int]]:
    """The writer folders of ``path`` in its folder, with the pid of the run that made each."""
    dst = Path(path)
    return _temporaries(dst.parent, dst.name)


def _temporaries(folder: Path, name: str | None) -> list[tuple[Path, int]]:
    """Writer folders in ``folder`` (of output ``name``, or of any output when ``None``)."""
    found = []
    with contextlib.suppress(OSError), os.scandir(folder) as entries:
        for entry in entries:
            m = _TEMP_RE.match(entry.name)
            if m and (name is None or m.group("name") == name):
                found.append((Path(entry.path), int(m.group("pid"))))
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def reclaim(path: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporaries a dead run (killed before it could clean up) left for ``path``.

    A folder whose writer pid is still alive belongs to a concurrent run and is left alone.
    Returns the removed folders and logs one line saying what was removed.
    """
    dst = Path(path)
    return _reclaim(_temporaries(dst.parent, dst.name), str(path))


def reclaim_folder(folder: str | os.PathLike[str]) -> list[Path]:
    """:func:`reclaim` for every output in ``folder`` at once (one scan of the folder): what
    a writer of many small files calls once before committing them with
    ``atomic_output(..., reclaim_dead=False)``."""
    return _reclaim(_temporaries(Path(folder), None), f"the files in {folder}")


def _reclaim(found: list[tuple[Path, int]], what: str) -> list[Path]:
    removed, freed = [], 0
    for folder, pid in found:
        if pid == os.getpid() or _alive(pid):
            continue
        freed += _size(folder)
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    if removed:
        log.warning(
            "removed %d temporary folder(s) (%s) left beside %s by a run that was killed "
            "(writer no longer running)",
            len(removed),
            _human(freed),
            what,
        )
    return removed


def _size(folder: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(folder):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, f)).st_size
    return total


def _human(n: int) -> str:
    size = float(n)
    for unit in ("bytes", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} bytes"


class _Signals:
    """What :func:`_signals_raise` knows: the signals that fired, and whether the output was
    committed (after which a signal no longer stops the write, see :meth:`committed`)."""

    def __init__(self) -> None:
        self.fired: list[int] = []
        self.deferred: list[int] = []
        self.done = False

    def committed(self) -> None:
        """The output is in place: a signal from now on waits for the cleanup and is then
        delivered to the handler that was there before (by default it ends the process, as it
        would have a moment later), instead of reporting a write that was stopped."""
        self.done = True


@contextlib.contextmanager
def _signals_raise() -> Iterator[_Signals]:
    """Turn SIGTERM/SIGHUP into :class:`Interrupted` while the block runs (main thread only);
    a second signal during the cleanup that follows is ignored so the cleanup can finish, and a
    signal after :meth:`_Signals.committed` is delivered once the block has finished."""
    state = _Signals()
    if threading.current_thread() is not threading.main_thread():
        yield state
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        if state.done:
            state.deferred.append(signum)
            return
        if state.fired:
            return
        state.fired.append(signum)
        raise Interrupted(signum)

    old = {}
    for s in SIGNALS:
        with contextlib.suppress(ValueError, OSError):
            old[s] = signal.signal(s, handler)
    try:
        yield state
    finally:
        state.fired.append(0)  # from here on, a signal only waits for the cleanup to finish
        for s, h in old.items():
            with contextlib.suppress(ValueError, OSError):
                signal.signal(s, h)
        if state.deferred:
            signal.raise_signal(state.deferred[0])


def _no_space(exc: BaseException) -> tuple[int, int] | None:
    """``(written, requested)`` from a short-write message, ``(-1, -1)`` for a bare errno."""
    if not isinstance(exc, OSError):
        return None
    m = _SHORT_WRITE.search(str(exc))
    if m:
        return int(m.group(2)), int(m.group(1))
    if exc.errno in NO_SPACE:
        return -1, -1
    return None


@contextlib.contextmanager
def atomic_output(
    path: str | os.PathLike[str],
    suffix: str | None = None,
    *,
    expected_bytes: int = 0,
    reclaim_dead: bool = True,
) -> Iterator[Path]:
    """Yield a path to write ``path`` to; move it (and its sidecars) there only on success.

    The yielded path has ``path``'s own file name, inside a hidden temporary folder beside
    ``path``; sidecar files the block writes into that folder (e.g. ONNX external data named
    ``<name>.data``) are moved beside ``path`` first, then the file itself. ``expected_bytes``
    (an estimate of what will be written) is only used to word a short-write error. ``suffix``
    is accepted for compatibility and ignored: the temporary has the final name.
    ``reclaim_dead``: first remove what dead runs left for ``path`` (:func:`reclaim`, a scan of
    ``path``'s folder); False makes a commit O(1) in the folder's size, for a writer of many
    files that reclaims them all once (:func:`reclaim_folder`). Only the block's own
    temporary folder is ever listed.
    """
    del suffix
    dst = Path(path)
    if reclaim_dead:
        reclaim(dst)
    folder = dst.parent / f".{dst.name}.{TEMP_TAG}-{os.getpid()}-{secrets.token_hex(4)}.tmp"
    with _signals_raise() as signals:
        try:
            folder.mkdir()
            tmp = folder / dst.name
            yield tmp
            if not tmp.exists():
                raise Fc2ConvError(f"could not write {dst}: the writer produced no file")
            umask = os.umask(0)
            os.umask(umask)
            for item in sorted(folder.iterdir(), key=lambda p: p == tmp):
                if item.name.startswith("."):
                    continue
                os.chmod(item, 0o666 & ~umask)  # temporaries may be 0600: normal permissions
                if item == tmp:
                    signals.committed()  # the rename below is the commit: not undone by a signal
                os.replace(item, dst.parent / item.name)
        except OSError as exc:
            short = _no_space(exc)
            if short is None:
                raise
            written = _size(folder)
            total = max(expected_bytes, written)
            why = "file size limit reached, " if exc.errno == errno.EFBIG else ""
            raise Fc2ConvError(
                f"could not write {dst}: no space left ({why}{written} of {total} bytes "
                f"written); nothing was written"
            ) from None
        finally:
            shutil.rmtree(folder, ignore_errors=True)
