"""The one table helper every listing command prints through (flask_immutant/cli_table.py)."""

from __future__ import annotations

import re

import pytest

from flask_immutant.cli_table import printable, table


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


def test_control_characters_in_a_cell_show_as_escapes() -> None:
    # Given cells holding text someone chose: ESC/OSC/CSI sequences, a newline, DEL and an 8-bit CSI
    hostile = "bad \x1b]0;pwned\x07\x1b[2J\x1b[31mRED\x1b[0m\nforged line\x7f\x9b2J\x00"
    # When they are laid out as a table
    lines = table(("NAME", "NOTE"), [["n\x1b[1m", hostile]])
    # Then each control character is a visible escape: one line per row, nothing a terminal acts on
    assert lines[1] == ("n\\x1b[1m  bad \\x1b]0;pwned\\x07\\x1b[2J\\x1b[31mRED\\x1b[0m\\nforged line\\x7f\\x9b2J"
                        "\\x00")
    assert len(lines) == 2 and not any(re.search("[\x00-\x1f\x7f-\x9f]", line) for line in lines)
    # And text without them (accents included) is unchanged
    assert printable("café, ünïcode: ok") == "café, ünïcode: ok"
