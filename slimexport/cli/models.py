"""``slimexport models``: the architectures with their sizes."""

from __future__ import annotations

from typing import Annotated

import typer

from slimexport.cli.app import app, handle_errors
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
