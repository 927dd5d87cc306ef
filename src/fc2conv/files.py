"""Safe output files: never overwrite an input, never leave a partial output behind.

Used by every command that writes a model. ``atomic_output(path)`` yields a temporary path in
the same folder; on success it is renamed over ``path`` (``os.replace`` is atomic on POSIX), on
any error it is deleted, so a failure halfway leaves no partial file.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from fc2conv.errors import Fc2ConvError


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


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str], suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it onto ``path`` only if the block succeeds.

    Sidecar files written next to the temporary file (ONNX external data) are the caller's to
    name after the final path.
    """
    dst = Path(path)
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{dst.name}.",
        suffix=suffix if suffix is not None else dst.suffix + ".tmp",
        dir=dst.parent,
    )
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file normal permissions
        os.replace(tmp, dst)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
