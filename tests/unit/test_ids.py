import re

import pytest

from lorafleet.common.ids import ID_PATTERN, is_valid_id, new_id, validate_id

GOOD = ["a", "A", "0", "exp-1", "adapter_2", "x" * 64, "a-b_c-D9"]
BAD = ["", "../x", "a/b", ".hidden", "x" * 65, "-lead", "_lead", "a.b", "a b", "abc\n", "é", "a\\b"]


@pytest.mark.parametrize("value", GOOD)
def test_valid_ids_pass_unchanged(value: str) -> None:
    assert validate_id(value) == value
    assert is_valid_id(value)


@pytest.mark.parametrize("value", BAD)
def test_invalid_ids_raise_with_kind_value_and_pattern(value: str) -> None:
    with pytest.raises(ValueError) as info:
        validate_id(value, "adapter id")
    message = str(info.value)
    assert "adapter id" in message
    assert ID_PATTERN in message
    assert repr(value)[:40] in message
    assert not is_valid_id(value)


@pytest.mark.parametrize("value", [None, 3, b"abc", ["a"]])
def test_non_strings_are_rejected(value: object) -> None:
    with pytest.raises(ValueError):
        validate_id(value)  # type: ignore[arg-type]


def test_long_bad_value_is_truncated_in_message() -> None:
    with pytest.raises(ValueError) as info:
        validate_id("/" * 500, "experiment id")
    shown = re.search(r"invalid experiment id (.*?): must match", str(info.value))
    assert shown is not None
    assert len(shown.group(1)) <= 80


def test_new_id_is_valid_prefixed_and_unique() -> None:
    ids = {new_id() for _ in range(200)}
    assert len(ids) == 200
    for value in ids:
        assert re.fullmatch(r"exp-[0-9a-f]{12}", value)
        assert validate_id(value) == value
    assert new_id("adapter").startswith("adapter-")


def test_new_id_rejects_bad_prefix() -> None:
    with pytest.raises(ValueError):
        new_id("../evil")
