"""Helpers shared by the tests: tiny models and runs, tolerance rules, references, fixtures, subprocess scripts.
Import them by full name: `from tests.support.numerics import assert_within`."""
