"""Documentation cannot fall behind the code: every hook has a heading in docs/plugins.md and a
test, and the README's settings table is the one generated from the settings rows."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from flask_immutant import ImmutantState, hookspecs
from flask_immutant.settings import markdown_table

ROOT = Path(__file__).resolve().parent.parent
PLUGINS_DOC = ROOT / "docs" / "plugins.md"
README = ROOT / "README.md"
TABLE_START, TABLE_END = "<!-- settings-table -->", "<!-- /settings-table -->"


def _hook_names() -> list[str]:
    marker = f"{hookspecs.PROJECT}_spec"
    return sorted(name for name, value in vars(hookspecs).items() if callable(value) and hasattr(value, marker))


HOOKS = _hook_names()


def _documented_hooks() -> set[str]:
    return set(re.findall(r"^### (immutant_\w+)\s*$", PLUGINS_DOC.read_text(encoding="utf-8"), flags=re.MULTILINE))


def _test_sources() -> dict[str, str]:
    here = Path(__file__).resolve()
    return {p.name: p.read_text(encoding="utf-8") for p in sorted(here.parent.glob("test_*.py")) if p != here}


def test_hookspecs_are_found() -> None:
    assert len(HOOKS) >= 10
    assert all(name.startswith("immutant_") for name in HOOKS)


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_has_a_docstring(hook: str) -> None:
    assert (getattr(hookspecs, hook).__doc__ or "").strip(), f"hookspecs.{hook} needs a docstring"


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_documented_in_plugins_md(hook: str) -> None:
    assert hook in _documented_hooks(), f"docs/plugins.md needs a '### {hook}' heading in its hook reference"


def test_plugins_md_documents_no_hook_that_does_not_exist() -> None:
    stale = _documented_hooks() - set(HOOKS)
    assert not stale, f"docs/plugins.md documents hooks that hookspecs.py does not have: {sorted(stale)}"


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_has_a_test(hook: str) -> None:
    pattern = re.compile(rf"\b{hook}\b")
    using = [name for name, source in _test_sources().items() if pattern.search(source)]
    assert using, f"no tests/test_*.py (other than test_docs.py) mentions {hook}: add a test for it"


def test_readme_settings_table_matches_the_settings_rows() -> None:
    # Given every settings row, core and plugin-contributed, as a fresh state sees them
    rows = ImmutantState.build({}, environ={}).settings.rows.values()
    expected = markdown_table(rows)
    # Then README.md shows exactly that table between its markers
    assert README.exists(), "README.md is missing: it must carry the settings table"
    readme = README.read_text(encoding="utf-8")
    assert TABLE_START in readme and TABLE_END in readme, f"README.md needs {TABLE_START} ... {TABLE_END} markers"
    shown = readme.split(TABLE_START, 1)[1].split(TABLE_END, 1)[0].strip()
    assert shown == expected, (
        "README.md's settings table is out of date; regenerate it with\n"
        "  python -c 'from flask_immutant import ImmutantState; from flask_immutant.settings import markdown_table; "
        "print(markdown_table(ImmutantState.build({}, environ={}).settings.rows.values()))'"
    )
