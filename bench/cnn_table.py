"""Convolutionalize every CNN classifier of the model zoo and describe its dense map.

For each model (``tests/zoo/zoo_models.py``, small random configs, float64 so that rounding does
not blur the gaps) at its training size ``S``:

- ``convolutionalize``: ok, or the one-sentence refusal;
- ``dense map @2x``: the map's shape on a ``2S`` input (per spatial axis);
- ``corner gap``: cell ``(0, 0)`` of that map against the original classifier run on the cell's
  window ``rf.window(0, 0)`` (the top-left ``S`` crop), max abs difference relative to the
  largest logit. Zero (to float64 rounding) for padding-free nets; with padding the cell sees
  the image where the crop's classifier saw zeros, and the gap says how much that matters;
- ``receptive field``: size / stride / padding per axis from :func:`fc2conv.receptive_field`,
  or the sentence that says why there is none.

    PYTHONPATH=src python bench/cnn_table.py
    PYTHONPATH=src python bench/cnn_table.py --models convnext,mobilenet_v1
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "zoo"))

from zoo_models import ZOO, logits  # noqa: E402

import fc2conv  # noqa: E402

CNNS = ["convnext", "resnet_hf", "mobilenet_v1", "mobilenet_v2", "monai_densenet2d",
        "monai_densenet3d", "monai_resnet3d", "monai_efficientnet3d"]


def _fmt(v: tuple[int, ...]) -> str:
    return "x".join(str(x) for x in v)


def _short(err: Exception, width: int = 110) -> str:
    text = str(err).splitlines()[0]
    return text if len(text) <= width else text[: width - 3] + "..."


def row(name: str) -> dict[str, Any]:
    zm = ZOO[name]
    dims = 3 if zm.family == "volume" else 2
    s = zm.image_size
    shape = (zm.channels, *(s,) * dims)
    torch.manual_seed(0)
    model = zm.build(0).double().eval()
    out: dict[str, Any] = {"model": name, "input": _fmt(shape[1:])}
    t0 = time.perf_counter()
    try:
        dense = fc2conv.convolutionalize(model, shape)
    except fc2conv.Fc2ConvError as err:
        out.update(convolutionalize=f"refused: {_short(err)}", dense="-", gap="-", field="-")
        return out
    out["convolutionalize"] = f"ok ({time.perf_counter() - t0:.1f} s)"
    gen = torch.Generator().manual_seed(1)
    big = torch.randn(1, zm.channels, *(2 * s,) * dims, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        fmap = logits(dense(big))
        out["dense"] = _fmt(tuple(fmap.shape[2:]))
        try:
            rf = fc2conv.receptive_field(dense, shape)
            window = rf.window(*(0,) * dims)
            region: Any = (..., *(slice(a, b) for a, b in zip(window[:dims], window[dims:],
                                                            strict=True)))
            ref = logits(model(big[region]))[0]
            cell = fmap[(0, slice(None), *(0,) * dims)]
            gap = float((cell - ref).abs().max()) / max(float(ref.abs().max()), 1e-300)
            out["gap"] = f"{gap:.2e}" + (" (exact)" if rf.exact else "")
            out["field"] = (f"{_fmt(rf.size)} / {_fmt(rf.stride)} / {_fmt(rf.padding)}")
        except fc2conv.Fc2ConvError as err:
            crop: Any = (..., *(slice(0, s),) * dims)
            ref = logits(model(big[crop]))[0]
            cell = fmap[(0, slice(None), *(0,) * dims)]
            gap = float((cell - ref).abs().max()) / max(float(ref.abs().max()), 1e-300)
            out["gap"] = f"{gap:.2e} (top-left crop)"
            out["field"] = f"none: {_short(err, 90)}"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(CNNS))
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    import warnings

    warnings.filterwarnings("ignore")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except ImportError:
        pass
    torch.set_num_threads(2)
    rows = [row(n) for n in args.models.split(",")]
    cols = [("model", "model"), ("input", "input"), ("convolutionalize", "convolutionalize"),
            ("dense", "dense map @2x"), ("gap", "corner-cell gap (rel.)"),
            ("field", "receptive field (size / stride / padding)")]
    print("| " + " | ".join(h for _, h in cols) + " |")
    print("|" + "|".join("---" for _ in cols) + "|")
    for r in rows:
        print("| " + " | ".join(str(r[k]) for k, _ in cols) + " |")


if __name__ == "__main__":
    main()
