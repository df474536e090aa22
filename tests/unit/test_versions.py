"""Version identity: one spelling of a version number everywhere."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prefect_lora.lora_tasks.errors import RegistryError
from prefect_lora.lora_tasks.versions import canonical_version, is_version


@pytest.mark.parametrize("given_, canonical", [("2", "2"), ("0002", "2"), (7, "7"), ("10", "10")])
def test_spellings_of_one_version_are_one_string(given_, canonical):
    assert is_version(given_) and canonical_version(given_) == canonical


@pytest.mark.parametrize("bad", ["\u0662", "\u00b2", "2.0", "-1", " 2", "0", "", "champion", None, 2.0])
def test_anything_but_ascii_digits_is_refused_with_what_to_type(bad):
    with pytest.raises(RegistryError, match="ASCII digits, like 3"):
        canonical_version(bad)


@given(st.text(max_size=6))
def test_a_string_is_a_version_exactly_when_it_is_ascii_digits(text):
    assert is_version(text) == (text != "" and all("0" <= ch <= "9" for ch in text))


@pytest.mark.parametrize("digits", ["9" * 19, "1" * 5000, "1" * 100_000])
def test_a_version_of_too_many_digits_is_refused_before_any_conversion(digits):
    """Found by hand: `promote NAME <5000 digits>` ended in int()'s conversion-limit traceback."""
    with pytest.raises(RegistryError) as err:
        canonical_version(digits)
    message = str(err.value)
    assert f"{len(digits):,} digits is not a version number" in message and len(message) < 200


def test_leading_zeros_do_not_count_as_digits_of_a_version():
    assert canonical_version("0" * 5000 + "7") == "7"
    assert canonical_version("9" * 18) == "9" * 18
