"""What every ``bench`` command module shares: the stderr console and the error exit."""

from __future__ import annotations

from typing import NoReturn

import typer
from rich.console import Console

console = Console(stderr=True)


def fail(message: str) -> NoReturn:
    """Print ``error: message`` on stderr and exit with status 2 (a bad input or a missing resource)."""
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(2)
