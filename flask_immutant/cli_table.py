"""The one way a ``flask immutant`` command prints rows: a header and aligned columns.

Every listing (``status``, ``list``, ``daemons``, ``jobs``, ``queues``, ``ctl show``, ``config``)
prints through :func:`echo_table`, so they look alike and a column is added in one place. Widths
fit the widest cell; numbers are right-aligned when their column is named in ``right``; an empty
cell (``None`` or ``""``) shows as ``-``; the last column is not padded. ``--json`` is the stable
form: these tables are for people and may change.

Cells hold text from the store (node names, error texts, a dead letter's reason) that anyone with
store access, or an exception quoting a message body, may have chosen: :func:`printable` shows its
control characters as visible escapes, so it cannot move the cursor, retitle or clear the
terminal, or forge a line. Every command line that prints stored text outside a table uses it too.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Sequence
from typing import Any

import click

#: What a missing value shows as.
EMPTY = "-"


#: C0 controls, DEL and C1 controls (8-bit CSI, OSC, ... in some terminals): never printed as they are.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escaped(match: re.Match[str]) -> str:
    char = match.group()
    return _NAMED.get(char) or f"\\x{ord(char):02x}"


def printable(text: str) -> str:
    """``text`` with each control character shown as an escape (``\\x1b``, ``\\n``): one line,
    inert on a terminal."""
    if text.isprintable():  # no control character (the common case, checked in C)
        return text
    return _CONTROL.sub(_escaped, text)


def cell(value: Any) -> str:
    return EMPTY if value is None or value == "" else printable(str(value))


def table(header: Sequence[str], rows: Iterable[Sequence[Any]], *, right: Collection[str] = (),
          indent: str = "") -> list[str]:
    """The lines of a table: ``header`` (column names), then one line per row."""
    cells = [list(header)] + [[cell(value) for value in row] for row in rows]
    for number, row in enumerate(cells):
        if len(row) != len(header):
            raise ValueError(f"table row {number} has {len(row)} cells for {len(header)} columns")
    widths = [max(len(row[column]) for row in cells) for column in range(len(header))]
    lines = []
    for row in cells:
        parts = [text.rjust(width) if name in right else text.ljust(width)
                 for name, text, width in zip(header, row, widths, strict=True)]
        lines.append((indent + "  ".join(parts)).rstrip())
    return lines


def echo_table(header: Sequence[str], rows: Iterable[Sequence[Any]], *, right: Collection[str] = (),
               indent: str = "") -> None:
    """Print :func:`table`."""
    for line in table(header, rows, right=right, indent=indent):
        click.echo(line)
