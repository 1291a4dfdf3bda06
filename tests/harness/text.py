"""Reading what commands print."""
from __future__ import annotations

from collections.abc import Sequence


def tail(text: str, lines: int = 5) -> str:
    """The last lines of a log, joined into one line for an error message."""
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])


def parse_env(text: str) -> dict[str, str]:
    """``env``'s output as a dict."""
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def lines(text: str) -> Sequence[str]:
    return text.strip().splitlines()
