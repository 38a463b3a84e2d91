"""What every ``bench`` command module shares: the stderr console and the error exit."""

from __future__ import annotations

from typing import TYPE_CHECKING, NoReturn

import typer
from rich.console import Console

if TYPE_CHECKING:
    from bench.interventions import Method

console = Console(stderr=True)


def fail(message: str) -> NoReturn:
    """Print ``error: message`` on stderr and exit with status 2 (a bad input or a missing resource)."""
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(2)


def check_layer_flag(method: str, layer: int | None, iti_hint: str) -> Method:
    """The registered method; refuses ``--layer`` for one that does not act at one chosen layer (it would be
    ignored silently). ``iti_hint``: how this command restricts ITI to one layer."""
    from bench.interventions import METHODS, get_method

    try:
        m = get_method(method)
    except ValueError as err:
        fail(str(err))
    if layer is not None and not m.needs_layer:
        hint = f" ITI chooses heads across all layers; to restrict it to one layer use {iti_hint}." \
            if method == "iti" else ""
        if method == "caa":
            hint = (" CAA chooses its layer per fold on the fold's validation questions; to fix it use "
                    f"{iti_hint.replace('--iti-layer', '--caa-layer')}.")
        fail(f"--layer does not apply to --method {method}: it does not act at one chosen layer.{hint} "
             "Methods that take --layer: " + ", ".join(n for n, x in METHODS.items() if x.needs_layer))
    return m
