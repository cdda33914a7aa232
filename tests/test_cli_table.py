"""The one table helper every listing command prints through (flask_immutant/cli_table.py)."""

from __future__ import annotations

import re

import pytest

from flask_immutant.cli_table import table


def test_columns_fit_the_widest_cell_and_numbers_align_right() -> None:
    lines = table(("NAME", "DEPTH", "NOTE"), [["/queue/a", 3, "x"], ["/queue/longer", 120, None]], right={"DEPTH"})
    assert lines == [
        "NAME           DEPTH  NOTE",
        "/queue/a           3  x",
        "/queue/longer    120  -",
    ]


def test_an_empty_cell_shows_a_dash_and_the_last_column_is_not_padded() -> None:
    lines = table(("A", "B"), [["", "long value"], [None, "v"]], indent="  ")
    assert lines == ["  A  B", "  -  long value", "  -  v"]
    assert all(line == line.rstrip() for line in lines)


def test_a_row_with_the_wrong_number_of_cells_is_refused() -> None:
    with pytest.raises(ValueError, match=re.escape("table row 2 has 1 cells for 2 columns")):
        table(("A", "B"), [["a", "b"], ["c"]])
