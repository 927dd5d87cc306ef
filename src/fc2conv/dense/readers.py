"""Readers that hand out channels-first windows of large images without loading them whole.

A reader is small and picklable (a path and a few numbers), opens its file lazily once per
process, and answers ``read(window)`` with a ``(C, *window)`` numpy array in the file's own
dtype. Channels-last files (TIFF and PNG samples, ``YXS``) are read as channels-first.

* arrays (numpy, torch) and zarr arrays / stores: ``(C, *spatial)`` or ``(*spatial)`` (one
  channel);
* TIFF / BigTIFF / OME-TIFF through tifffile's zarr interface, pyramid ``level``;
* PNG / JPEG through Pillow (decoded whole: these formats have no random access);
* whole-slide formats through OpenSlide (``fc2conv[slide]``), pyramid ``level``.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fc2conv.errors import Fc2ConvError

Window = tuple[slice, ...]
_TIFF = {".tif", ".tiff", ".btf", ".tf8", ".svs"}
_PIL = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}
_SLIDE = {".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide"}


class Reader:
    """A lazily opened image: ``shape`` is ``(C, *spatial)``."""

    shape: tuple[int, ...]
    dtype: np.dtype
    source: str = "array"

    def read(self, window: Window) -> np.ndarray:
        raise NotImplementedError

    def thumbnail(self, max_side: int) -> np.ndarray:
        """A ``(C, h, w)`` subsample of a 2-D image (every k-th pixel) for previews."""
        step = max(1, -(-max(self.shape[1:]) // max_side))
        full = tuple(slice(0, n) for n in self.shape[1:])
        if self.shape[1] * self.shape[2] <= 4096 * 4096:
            return self.read(full)[(slice(None),) + tuple(slice(None, None, step)
                                                          for _ in full)]
        rows = [self.read((slice(r, r + 1), slice(0, self.shape[2])))[:, :, ::step]
                for r in range(0, self.shape[1], step)]
        return np.concatenate(rows, axis=1)


def _channels_first(shape: Sequence[int], dims: int | None) -> tuple[int, ...]:
    if dims is not None and len(shape) == dims:
        return (1, *shape)
    return tuple(shape)


class ArrayReader(Reader):
    """An in-memory ``(C, *spatial)`` array (a plain ``(*spatial)`` array is one channel)."""

    def __init__(self, array: Any, dims: int | None = None) -> None:
        if hasattr(array, "detach"):
            array = array.detach().cpu().numpy()
        array = np.asarray(array)
        if dims is not None and array.ndim == dims:
            array = array[None]
        self.array = array
        self.shape = tuple(array.shape)
        self.dtype = array.dtype

    def read(self, window: Window) -> np.ndarray:
        return np.asarray(self.array[(slice(None), *window)])


class StageMap(Reader):
    """The map between two stages of a staged dense map (:mod:`fc2conv.dense.stages`): a
    lazily computed ``(C, *cells)`` dask array, computed whole by :meth:`materialize` (once,
    in the thread that asks first) and held until :meth:`release`. ``read`` hands out copies
    (the next stage may start with an in-place op on its tile)."""

    source = "stage"

    def __init__(self, array: Any) -> None:
        import threading

        self.array = array
        self.shape = tuple(int(n) for n in array.shape)
        self.dtype = np.dtype(np.float32)
        self._data: np.ndarray | None = None
        self._lock = threading.Lock()

    def materialize(self) -> None:
        with self._lock:
            if self._data is None:
                self._data = np.asarray(self.array)

    @property
    def held(self) -> bool:
        """Whether the map is computed and held."""
        return self._data is not None

    def hold(self, data: np.ndarray) -> None:
        """Take ``data``, the map computed elsewhere (by a run that reports progress)."""
        with self._lock:
            self._data = data

    def release(self) -> None:
        with self._lock:
            self._data = None

    def read(self, window: Window) -> np.ndarray:
        data = self._data
        if data is None:
            self.materialize()
            data = self._data
        assert data is not None
        return np.array(data[(slice(None), *window)])

    def __reduce__(self) -> Any:  # a stage map lives in this process only
        raise Fc2ConvError("a staged dense map runs in one process (not on a dask.distributed "
                           "cluster)")


class ZarrReader(Reader):
    """A zarr array ``(C, *spatial)``, by path (reopened per process) or as an object."""

    source = "zarr"

    def __init__(self, store: Any, dims: int | None = None) -> None:
        self.path = str(store) if isinstance(store, (str, os.PathLike)) else None
        self._array = None if self.path else store
        arr = self._open()
        self.one_channel = dims is not None and len(arr.shape) == dims
        self.shape = _channels_first(arr.shape, dims)
        self.dtype = np.dtype(arr.dtype)

    def _open(self) -> Any:
        if self._array is not None:
            return self._array
        return _open_zarr(self.path)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if self.path:
            state["_array"] = None
        return state

    def read(self, window: Window) -> np.ndarray:
        arr = self._open()
        if self.one_channel:
            return np.asarray(arr[window])[None]
        return np.asarray(arr[(slice(None), *window)])


@functools.lru_cache(maxsize=8)
def _open_zarr(path: str) -> Any:
    import zarr

    node = zarr.open(path, mode="r")
    if isinstance(node, zarr.Group):
        names = sorted(k for k, _ in node.arrays())
        if not names:
            raise Fc2ConvError(f"the zarr group {path} holds no array")
        node = node[names[0]]
    return node


class TiffReader(Reader):
    """A TIFF / BigTIFF / OME-TIFF read through tifffile's zarr interface (no full decode)."""

    source = "tiff"

    def __init__(self, path: str, level: int = 0, series: int = 0) -> None:
        self.path, self.level, self.series = str(path), level, series
        arr, axes = _open_tiff(self.path, level, series)
        self.channels_last = axes.endswith("S")
        spatial = [n for ax, n in zip(axes, arr.shape, strict=True) if ax in "ZYX"]
        other = [ax for ax, n in zip(axes, arr.shape, strict=True) if ax not in "ZYXS" and n > 1]
        if other:
            raise Fc2ConvError(f"{path} has axes {axes!r}; dense maps read Y, X (Z) and "
                               f"samples only")
        self.squeeze = tuple(i for i, ax in enumerate(axes) if ax not in "ZYXSC")
        self.has_c = "S" in axes or "C" in axes
        channels = arr.shape[axes.index("S")] if "S" in axes else (
            arr.shape[axes.index("C")] if "C" in axes else 1)
        self.shape = (channels, *spatial)
        self.dtype = np.dtype(arr.dtype)

    def read(self, window: Window) -> np.ndarray:
        arr, axes = _open_tiff(self.path, self.level, self.series)
        index: list[Any] = []
        it = iter(window)
        for ax in axes:
            index.append(next(it) if ax in "ZYX" else (slice(None) if ax in "SC" else 0))
        data = np.asarray(arr[tuple(index)])
        if not self.has_c:
            return data[None]
        if self.channels_last:
            return np.moveaxis(data, -1, 0)
        return data


@functools.lru_cache(maxsize=8)
def _open_tiff(path: str, level: int, series: int) -> tuple[Any, str]:
    import tifffile
    import zarr

    with tifffile.TiffFile(path) as tif:
        if series >= len(tif.series):
            raise Fc2ConvError(f"{path} has {len(tif.series)} image series, not {series + 1}")
        s = tif.series[series]
        levels = len(s.levels)
        if not 0 <= level < levels:
            raise Fc2ConvError(f"{path} has {levels} pyramid level(s); level {level} does not "
                               f"exist")
        axes = s.levels[level].axes
    store = tifffile.imread(path, aszarr=True, series=series, level=level)
    return zarr.open(store, mode="r"), axes


class PillowReader(Reader):
    """A PNG / JPEG decoded by Pillow (these formats cannot be read piecewise)."""

    source = "image"

    def __init__(self, path: str) -> None:
        self.path = str(path)
        img = _open_pil(self.path)
        self.shape = (img.shape[0], *img.shape[1:])
        self.dtype = img.dtype

    def read(self, window: Window) -> np.ndarray:
        return _open_pil(self.path)[(slice(None), *window)]


@functools.lru_cache(maxsize=2)
def _open_pil(path: str) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        rgb: Any = img if img.mode in ("L", "RGB", "RGBA", "I", "I;16", "F") else img.convert(
            "RGB")
        data = np.asarray(rgb)
    return data[None] if data.ndim == 2 else np.ascontiguousarray(np.moveaxis(data, -1, 0))


class SlideReader(Reader):
    """A whole-slide image through OpenSlide, RGB at pyramid ``level``."""

    source = "openslide"

    def __init__(self, path: str, level: int = 0) -> None:
        self.path, self.level = str(path), level
        slide = _open_slide(self.path)
        if not 0 <= level < slide.level_count:
            raise Fc2ConvError(f"{path} has {slide.level_count} levels; level {level} does not "
                               f"exist")
        w, h = slide.level_dimensions[level]
        self.shape = (3, h, w)
        self.dtype = np.dtype(np.uint8)
        self.downsample = float(slide.level_downsamples[level])

    def read(self, window: Window) -> np.ndarray:
        rows, cols = window
        slide = _open_slide(self.path)
        origin = (int(cols.start * self.downsample), int(rows.start * self.downsample))
        region = slide.read_region(origin, self.level, (cols.stop - cols.start,
                                                        rows.stop - rows.start))
        return np.moveaxis(np.asarray(region.convert("RGB")), -1, 0)


@functools.lru_cache(maxsize=4)
def _open_slide(path: str) -> Any:
    try:
        import openslide
    except ImportError:
        raise Fc2ConvError("reading whole-slide images needs OpenSlide: pip install "
                           "'fc2conv[slide]'") from None
    return openslide.OpenSlide(path)


def open_image(image: Any, dims: int | None = None, level: int = 0) -> Any:
    """A :class:`Reader` (or the dask array itself) for any supported ``image``.

    ``dims`` (2 or 3) is the number of spatial axes the model expects; an array with exactly
    that many axes is one channel.
    """
    if isinstance(image, Reader):
        return image
    if type(image).__module__.startswith("dask"):
        if dims is not None and image.ndim == dims:
            image = image[None]
        return image
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.exists():
            raise Fc2ConvError(f"no such image: {path}")
        suffix = path.suffix.lower()
        if path.is_dir() or suffix == ".zarr":
            return ZarrReader(str(path), dims)
        if suffix in _TIFF or suffix in {".ome"}:
            return TiffReader(str(path), level)
        if suffix in _PIL:
            return PillowReader(str(path))
        if suffix in _SLIDE:
            return SlideReader(str(path), level)
        raise Fc2ConvError(f"cannot read {path.name}: dense maps read arrays, zarr, TIFF, "
                           f"PNG / JPEG and (with fc2conv[slide]) whole-slide files")
    if type(image).__module__.startswith("zarr"):
        return ZarrReader(image, dims)
    if isinstance(image, np.ndarray) or hasattr(image, "detach"):
        return ArrayReader(image, dims)
    raise Fc2ConvError(f"cannot read an image of type {type(image).__name__}")
