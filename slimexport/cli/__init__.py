"""The slimexport command line. Each command translates its options and calls one library function; the options
are built from the config fields that own them (:mod:`slimexport.cli.options`)."""

# Each module registers its commands, in the order `slimexport --help` lists them.
from slimexport.cli import training  # isort: skip  # noqa: F401
from slimexport.cli import deploying  # isort: skip  # noqa: F401
from slimexport.cli import pipeline  # isort: skip  # noqa: F401
from slimexport.cli import sweeping  # isort: skip  # noqa: F401
from slimexport.cli import models  # isort: skip  # noqa: F401
from slimexport.cli.app import app  # isort: skip


def main() -> None:
    app()


__all__ = ["app", "main"]
