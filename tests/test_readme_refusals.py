"""The README's bad-input table is exactly what the tests check (``tests/refusals.py``)."""

from __future__ import annotations

from tests.refusals import README, load_all, readme_table, render_table


def test_readme_bad_input_table_matches_the_tests():
    refusals = load_all()
    assert len(refusals) >= 30 and {r.exit_code for r in refusals} == {2, 3, 4, 5}
    assert readme_table(README.read_text()) == render_table(refusals), (
        "README.md's bad-input table differs from the refusals the tests check: "
        "run `.venv/bin/python -m tests.refusals --write` and commit README.md"
    )
