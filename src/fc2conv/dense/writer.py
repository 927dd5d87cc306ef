"""The zarr output of a dense map: written chunk by chunk, each chunk committed whole.

Layout: a zarr group at ``out`` with ``scores`` ``(K, *map)`` float32 (one zarr chunk per
tile) and optionally ``labels`` ``(*map)`` int32 (the argmax). The geometry (field size,
stride, offset, window size, the model's digest) lives in the group's attributes, so any cell
``i`` maps back to its input window ``[offset + i * stride, offset + i * stride + window)``.

A chunk counts as done only when its marker ``.fc2conv-done/<i.j>`` exists; the marker is
written through :func:`fc2conv.files.atomic_output` (a temporary beside it, then
``os.replace``) after the chunk's data, so a task killed mid-write leaves no marker and its
chunk is recomputed: every chunk is whole or not there. Re-running with the same ``out`` skips
the finished chunks. The temporaries killed workers left are reclaimed when the store is
opened and when the run finishes (one scan of the marker folder each), so a commit costs O(1)
however many chunks are done.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from fc2conv.errors import Fc2ConvError
from fc2conv.files import atomic_output, reclaim_folder

DONE = ".fc2conv-done"


def _key(index: tuple[int, ...]) -> str:
    return ".".join(str(i) for i in index)


class MapStore:
    """The output zarr group of one dense map (picklable: a path and shapes)."""

    def __init__(self, path: str, shape: tuple[int, ...], chunks: tuple[int, ...],
                 attrs: dict[str, Any], labels: bool) -> None:
        self.path, self.shape, self.chunks, self.labels = str(path), shape, chunks, labels
        self.attrs = attrs

    def open(self, overwrite: bool = False) -> int:
        """Create the store, or reopen a matching one; the number of chunks already done."""
        import zarr

        root = Path(self.path)
        if root.exists() and overwrite:
            if not (root / "zarr.json").exists() and any(root.iterdir()):
                raise Fc2ConvError(f"{root} exists and is not a zarr store; not overwriting it")
            shutil.rmtree(root)
        if root.exists():
            try:
                group = zarr.open_group(self.path, mode="r")
                found = dict(group.attrs).get("fc2conv_dense")
            except Exception:  # noqa: BLE001 - not a zarr group at all
                found = None
            if found != json.loads(json.dumps(self.attrs)):
                raise Fc2ConvError(
                    f"{root} exists and holds another map (different model, image or tiling); "
                    f"choose another --out or pass overwrite"
                )
            reclaim_folder(root / DONE)  # what killed workers left, once for all chunks
            return len(self.done())
        group = zarr.open_group(self.path, mode="w")
        group.attrs["fc2conv_dense"] = self.attrs
        group.create_array("scores", shape=self.shape, chunks=self.chunks, dtype="float32",
                           fill_value=np.nan)
        if self.labels:
            group.create_array("labels", shape=self.shape[1:], chunks=self.chunks[1:],
                               dtype="int32", fill_value=-1)
        (root / DONE).mkdir()
        return 0

    def done(self) -> set[str]:
        folder = Path(self.path) / DONE
        return {p.name for p in folder.iterdir() if not p.name.startswith(".")} \
            if folder.exists() else set()

    def is_done(self, index: tuple[int, ...]) -> bool:
        return (Path(self.path) / DONE / _key(index)).exists()

    def write(self, index: tuple[int, ...], origin: tuple[int, ...], block: np.ndarray) -> int:
        """Write one chunk (``block`` of scores at map cell ``origin``), then commit it."""
        import zarr

        window = tuple(slice(o, o + n) for o, n in zip(origin, block.shape[1:], strict=True))
        group: Any = zarr.open_group(self.path, mode="r+")
        group["scores"][(slice(None), *window)] = block
        if self.labels:
            group["labels"][window] = block.argmax(axis=0).astype(np.int32)
        with atomic_output(Path(self.path) / DONE / _key(index), reclaim_dead=False) as tmp:
            tmp.write_text("done\n")
        return 1

    def finish(self) -> None:
        import zarr

        reclaim_folder(Path(self.path) / DONE)  # what workers killed during this run left
        group = zarr.open_group(self.path, mode="r+")
        group.attrs["complete"] = True

    def scores(self) -> Any:
        import dask.array as da
        import zarr

        return da.from_zarr(zarr.open_group(self.path, mode="r")["scores"])
