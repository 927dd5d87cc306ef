"""``fc2conv dense``: the exact dense score map of a model on a large image, into zarr."""

from __future__ import annotations

from typing import Any

import click

from fc2conv.errors import Fc2ConvError


def _ints(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise Fc2ConvError(f"expected integers like 3,224,224, got {text!r}") from None


def _floats(text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise Fc2ConvError(f"expected numbers like 123.7,116.3,103.5, got {text!r}") from None


@click.command(epilog="""\b
Examples:
  fc2conv dense net.pt2 slide.tif --out map.zarr --input-shape 3,224,224 --preview map.png
  fc2conv dense fcn.pt2 scan.ome.tif --out map.zarr --level 1 --workers 2 --tile 2048
""")
@click.argument("model", type=click.Path(dir_okay=False))
@click.argument("image", type=click.Path())
@click.option("--out", required=True, type=click.Path(), help="Output zarr group (resumes).")
@click.option("--input-shape", help="The classifier's input C,H,W (convolutionalized first).")
@click.option("--tile", type=int, help="Input pixels per tile side.")
@click.option("--stages", type=int,
              help="Split the net into N stages, each tiled with its own receptive field "
                   "(default: one stage for an image read from a file).")
@click.option("--workers", type=int, help="Start a LocalCluster of N worker processes.")
@click.option("--scheduler", help="Address of a running dask scheduler.")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda.")
@click.option("--level", type=int, default=0, show_default=True, help="Pyramid level to read.")
@click.option("--mean", help="Per-channel mean, in the image's units (e.g. 123.7,116.3,103.5).")
@click.option("--std", help="Per-channel std, in the image's units.")
@click.option("--argmax", is_flag=True, help="Also write the argmax label map.")
@click.option("--preview", type=click.Path(dir_okay=False), help="Write a PNG preview.")
@click.option("--preview-class", type=int, help="Class shown in the preview (default argmax).")
def dense(model: str, image: str, out: str, input_shape: str | None, tile: int | None,
          stages: int | None, workers: int | None, scheduler: str | None, device: str, level: int,
          mean: str | None, std: str | None, argmax: bool, preview: str | None,
          preview_class: int | None) -> None:
    """Score every window of IMAGE with MODEL (.pt2): an exact dense map, tile by tile."""
    import os

    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from fc2conv.dense import dense_map
    from fc2conv.dense.readers import open_image
    from fc2conv.pytorch.export_io import load

    if workers is not None and scheduler is not None:
        raise Fc2ConvError("give --workers or --scheduler, not both")
    if not os.path.exists(image):
        raise FileNotFoundError(2, "No such file or directory", image)
    if os.path.abspath(out) == os.path.abspath(image) or (
            preview and os.path.abspath(preview) in (os.path.abspath(image),
                                                     os.path.abspath(model))):
        raise Fc2ConvError("an output path is an input; inputs are never overwritten")
    shape, mean_v, std_v = _ints(input_shape), _floats(mean), _floats(std)
    program = load(model)
    net = program
    console = Console(stderr=True)
    with Progress(TextColumn("dense map"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("tiles {task.fields[rate]}"),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=console,
                  transient=True) as bar:
        task = bar.add_task("tiles", total=None, rate="")
        import time

        started = time.monotonic()
        first: list[int] = []

        def progress(done: int, total: int) -> None:
            if not first:
                if done:
                    console.print(f"resuming: {done} of {total} tiles already done, skipped")
                bar.update(task, total=total, completed=done)
                first.append(done)
            else:
                rate = (done - first[0]) / max(time.monotonic() - started, 1e-9)
                bar.update(task, completed=done, rate=f"{rate:.2f}/s")

        scores = dense_map(net, image, input_shape=shape, tile=tile, out=out, device=device,
                           scheduler=scheduler, workers=workers, level=level, mean=mean_v,
                           std=std_v, argmax=argmax, progress=progress, stages=stages)
    click.echo(f"wrote {out}: scores {tuple(scores.shape)}")
    if preview:
        import zarr

        from fc2conv.dense.preview import save_preview

        attrs: Any = dict(zarr.open_group(out, mode="r").attrs)["fc2conv_dense"]
        save_preview(scores, open_image(image, None, level), preview,
                     stride=tuple(attrs["stride"]), offset=tuple(attrs["offset"]),
                     window=tuple(attrs["window_size"]), cls=preview_class)
        click.echo(f"wrote {preview}")
