"""``slimexport models``: the architectures with their sizes."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from slimexport.cli.app import app, handle_errors, say
from slimexport.console import console


@app.command()
@handle_errors
def models(
    num_classes: Annotated[int, typer.Option("--num-classes", min=2, help="Output classes.")] = 10,
    in_channels: Annotated[int, typer.Option("--in-channels", min=1, help="Input channels.")] = 3,
    image_size: Annotated[int, typer.Option("--image-size", min=8, help="Input height = width, for MACs.")] = 32,
    torchvision_models: Annotated[
        bool,
        typer.Option(
            "--torchvision",
            help="List torchvision's classification models instead: params, MACs, and whether they have BatchNorm "
            "(what network slimming scores; those without are refused).",
        ),
    ] = False,
):
    """List the architectures with their parameter counts and MACs."""
    from rich.table import Table

    from slimexport.models import create_model, list_models
    from slimexport.stats import count_macs, count_params

    Console = type(console)
    if torchvision_models:
        from slimexport.models.external import torchvision_table

        table = Table(
            title=f"torchvision, {num_classes} classes, 3×{image_size}×{image_size} input (--arch torchvision:NAME)"
        )
        for col in ("--arch", "params", "MACs", "BatchNorm"):
            table.add_column(col, justify="right" if col in ("params", "MACs") else "left")
        for r in torchvision_table(num_classes, image_size):
            table.add_row(
                f"torchvision:{r['name']}",
                f"{r['params']:,}" if r["params"] is not None else "–",
                f"{r['macs']:,}" if r["macs"] is not None else "–",
                "yes" if r["bn"] else "no: refused",
            )
        Console(width=160).print(table)
        return
    table = Table(title=f"{num_classes} classes, {in_channels}×{image_size}×{image_size} input")
    for col in ("arch", "params", "MACs", "family"):
        table.add_column(col, justify="right" if col in ("params", "MACs") else "left")
    for name, desc in list_models():
        m = create_model(name, num_classes, in_channels)
        table.add_row(name, f"{count_params(m):,}", f"{count_macs(m, in_channels, (image_size, image_size)):,}", desc)
    Console(width=160).print(table)
    console.print(
        "Any other CNN: --arch torchvision:NAME (slimexport models --torchvision), timm:NAME, FILE.py:FACTORY"
    )


@app.command("detection-data")
@handle_errors
def detection_data(
    out: Annotated[Path, typer.Argument(help="Directory to write (images/, labels/, data.yaml).")],
    train: Annotated[int, typer.Option("--train", min=1, help="Training images.")] = 1000,
    val: Annotated[int, typer.Option("--val", min=1, help="Validation images.")] = 200,
    image_size: Annotated[int, typer.Option("--image-size", min=32, help="Canvas height = width.")] = 160,
    max_objects: Annotated[int, typer.Option("--max-objects", min=1, help="Items per image, at most.")] = 4,
    seed: Annotated[int, typer.Option("--seed", help="Same seed, same files.")] = 0,
    force: Annotated[bool, typer.Option("--force", "-f", help="Replace an existing OUT.")] = False,
):
    """Write an offline detection data set in Ultralytics' format: Fashion-MNIST items (the embedded subset) pasted
    on canvases, boxes known, 10 classes; for `pipeline --arch ultralytics:... --dataset ultralytics:OUT/data.yaml`."""
    from slimexport.detect.data import make_dataset

    path = make_dataset(out, train, val, image_size, max_objects, seed, force)
    say(f"wrote {train} train / {val} val images of {image_size}x{image_size}: {path}")
