"""mim.checks: each check's accepted and rejected values, and the exact message."""

from __future__ import annotations

import ast
import math
import re
from pathlib import Path

import pytest

from mim.checks import check_bool, check_choice, check_int, check_pair_range, check_range, invalid


def _raises(message: str):
    return pytest.raises(ValueError, match=f"^{re.escape(message)}$")


class Owner:
    pass


# ---------------------------------------------------------------------------------------------- invalid
def test_invalid_message_and_owner_forms():
    err = invalid("MaskedEncoder", "in_chans", "an integer >= 1", 0)
    assert isinstance(err, ValueError)
    assert str(err) == "MaskedEncoder.in_chans must be an integer >= 1, got 0"
    assert str(invalid(Owner(), "x", "True or False", "yes")) == "Owner.x must be True or False, got 'yes'"
    assert str(invalid(Owner, "x", "True or False", None)) == "Owner.x must be True or False, got None"


def test_every_check_appends_the_hint_after_the_range():
    with _raises("X.ramp must be a number in [0, 1] (a fraction of training), got 2"):
        check_range("X", "ramp", 2, 0, 1, hint="a fraction of training")
    with _raises("X.n must be an integer >= 0 (0: never), got -1"):
        check_int("X", "n", -1, minimum=0, hint="0: never")
    with _raises("X.p must be a pair (lo, hi) with 0 < lo <= hi <= 1 (area fraction), got (0, 1)"):
        check_pair_range("X", "p", (0, 1), 0, 1, low_open=True, hint="area fraction")
    with _raises("X.c must be one of ('a', 'b') (see docs), got 'z'"):
        check_choice("X", "c", "z", ("a", "b"), hint="see docs")
    assert str(invalid("X", "f", "a thing", 1, hint="why")) == "X.f must be a thing (why), got 1"


# ---------------------------------------------------------------------------------------------- check_int
@pytest.mark.parametrize(
    ("kwargs", "value"),
    [({}, 1), ({}, 10**9), ({"minimum": 0}, 0), ({"minimum": None}, -5), ({"minimum": 1, "maximum": 100}, 100)],
)
def test_check_int_accepts(kwargs, value):
    assert check_int("X", "n", value, **kwargs) == value


@pytest.mark.parametrize(
    ("kwargs", "value", "message"),
    [
        ({}, 0, "X.n must be an integer >= 1, got 0"),
        ({}, True, "X.n must be an integer >= 1, got True"),
        ({"minimum": 0}, False, "X.n must be an integer >= 0, got False"),
        ({}, 2.0, "X.n must be an integer >= 1, got 2.0"),
        ({}, "3", "X.n must be an integer >= 1, got '3'"),
        ({}, None, "X.n must be an integer >= 1, got None"),
        ({"minimum": 1, "maximum": 100}, 101, "X.n must be an integer in [1, 100], got 101"),
        ({"minimum": None, "maximum": 5}, 6, "X.n must be an integer <= 5, got 6"),
        ({"minimum": None}, 1.5, "X.n must be an integer, got 1.5"),
    ],
)
def test_check_int_rejects(kwargs, value, message):
    with _raises(message):
        check_int("X", "n", value, **kwargs)


def test_check_int_example_from_the_docs():
    with _raises("MaskedEncoder.in_chans must be an integer >= 1, got 0"):
        check_int("MaskedEncoder", "in_chans", 0)


# ---------------------------------------------------------------------------------------------- check_range
@pytest.mark.parametrize(
    ("args", "kwargs", "value"),
    [
        ((0, 1), {"low_open": True, "high_open": True}, 0.5),
        ((0, 1), {}, 0),
        ((0, 1), {}, 1),
        ((0, 1), {"high_open": True}, 0.0),
        ((0, math.inf), {"low_open": True}, math.inf),
        ((0, math.inf), {"high_open": True}, 1e300),
        ((-math.inf, math.inf), {}, -3),
    ],
)
def test_check_range_accepts_and_converts(args, kwargs, value):
    out = check_range("X", "r", value, *args, **kwargs)
    assert out == value and type(out) is float


@pytest.mark.parametrize(
    ("args", "kwargs", "value", "message"),
    [
        ((0, 1), {"low_open": True, "high_open": True}, 1.0, "X.r must be a number in (0, 1), got 1.0"),
        ((0, 1), {"low_open": True, "high_open": True}, 0, "X.r must be a number in (0, 1), got 0"),
        ((0, 1), {"high_open": True}, 1, "X.r must be a number in [0, 1), got 1"),
        ((0, 1), {"low_open": True}, -0.5, "X.r must be a number in (0, 1], got -0.5"),
        ((0, 1), {}, 1.5, "X.r must be a number in [0, 1], got 1.5"),
        ((0, 1), {}, math.nan, "X.r must be a number in [0, 1], got nan"),
        ((0, 1), {}, True, "X.r must be a number in [0, 1], got True"),
        ((0, 1), {}, "0.5", "X.r must be a number in [0, 1], got '0.5'"),
        ((0, 1), {}, None, "X.r must be a number in [0, 1], got None"),
        ((0, 0.5), {}, 0.75, "X.r must be a number in [0, 0.5], got 0.75"),
        ((0, math.inf), {"low_open": True}, 0, "X.r must be a number > 0, got 0"),
        ((0, math.inf), {}, -1, "X.r must be a number >= 0, got -1"),
        ((0, math.inf), {"high_open": True}, math.inf, "X.r must be a finite number >= 0, got inf"),
        ((0, math.inf), {"low_open": True, "high_open": True}, math.nan, "X.r must be a finite number > 0, got nan"),
        ((-math.inf, 1), {"high_open": True}, 1, "X.r must be a number < 1, got 1"),
        (
            (-math.inf, math.inf),
            {"low_open": True, "high_open": True},
            math.inf,
            "X.r must be a finite number, got inf",
        ),
        ((-math.inf, math.inf), {"low_open": True}, -math.inf, "X.r must be a number > -inf, got -inf"),
    ],
)
def test_check_range_rejects(args, kwargs, value, message):
    with _raises(message):
        check_range("X", "r", value, *args, **kwargs)


# ---------------------------------------------------------------------------------------------- check_pair_range
@pytest.mark.parametrize(
    ("args", "kwargs", "value"),
    [
        ((0, 1), {"low_open": True}, (0.15, 0.2)),
        ((0, 1), {"low_open": True}, [1, 1]),
        ((0, math.inf), {"low_open": True}, (0.75, math.inf)),
        ((0, 1), {}, (0, 0)),
    ],
)
def test_check_pair_range_accepts_and_converts(args, kwargs, value):
    out = check_pair_range("X", "p", value, *args, **kwargs)
    assert out == tuple(value) and isinstance(out, tuple) and all(type(v) is float for v in out)


@pytest.mark.parametrize(
    ("args", "kwargs", "value", "message"),
    [
        ((0, 1), {"low_open": True}, (0.5, 0.2), "X.p must be a pair (lo, hi) with 0 < lo <= hi <= 1, got (0.5, 0.2)"),
        ((0, 1), {"low_open": True}, (0, 0.2), "X.p must be a pair (lo, hi) with 0 < lo <= hi <= 1, got (0, 0.2)"),
        ((0, 1), {"low_open": True}, (0.5, 1.5), "X.p must be a pair (lo, hi) with 0 < lo <= hi <= 1, got (0.5, 1.5)"),
        ((0, 1), {}, (0.1, 0.2, 0.3), "X.p must be a pair (lo, hi) with 0 <= lo <= hi <= 1, got (0.1, 0.2, 0.3)"),
        ((0, 1), {}, 0.5, "X.p must be a pair (lo, hi) with 0 <= lo <= hi <= 1, got 0.5"),
        ((0, 1), {}, "01", "X.p must be a pair (lo, hi) with 0 <= lo <= hi <= 1, got '01'"),
        ((0, 1), {}, (True, 1), "X.p must be a pair (lo, hi) with 0 <= lo <= hi <= 1, got (True, 1)"),
        ((0, 1), {}, (math.nan, 1), "X.p must be a pair (lo, hi) with 0 <= lo <= hi <= 1, got (nan, 1)"),
        ((0, math.inf), {"low_open": True}, (-1, 2), "X.p must be a pair (lo, hi) with 0 < lo <= hi, got (-1, 2)"),
        ((0, 1), {"high_open": True}, (0, 1), "X.p must be a pair (lo, hi) with 0 <= lo <= hi < 1, got (0, 1)"),
    ],
)
def test_check_pair_range_rejects(args, kwargs, value, message):
    with _raises(message):
        check_pair_range("X", "p", value, *args, **kwargs)


# ---------------------------------------------------------------------------------------------- check_choice
def test_check_choice_accepts():
    assert check_choice("X", "mode", "inside", ("overlap", "inside")) == "inside"
    assert check_choice("X", "in_chans", 3, (1, 3)) == 3
    assert check_choice("X", "flag", True, (True, "auto")) is True


@pytest.mark.parametrize(
    ("value", "choices", "message"),
    [
        ("edge", ("overlap", "inside"), "X.c must be one of ('overlap', 'inside'), got 'edge'"),
        (2, (1, 3), "X.c must be one of (1, 3), got 2"),
        (True, (1, 3), "X.c must be one of (1, 3), got True"),
        (["a"], frozenset({"a"}), "X.c must be one of ('a'), got ['a']"),
        (None, ("a",), "X.c must be one of ('a'), got None"),
    ],
)
def test_check_choice_rejects(value, choices, message):
    with _raises(message):
        check_choice("X", "c", value, choices)


# ---------------------------------------------------------------------------------------------- check_bool
def test_check_bool():
    assert check_bool("X", "cache", True) is True
    assert check_bool("X", "cache", False) is False
    for value in (0, 1, "yes", None):
        with _raises(f"X.cache must be True or False, got {value!r}"):
            check_bool("X", "cache", value)


# ---------------------------------------------------------------------------------------------- floor 1
def test_checks_imports_only_the_standard_library():
    import mim.checks

    tree = ast.parse(Path(mim.checks.__file__).read_text())
    roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    roots |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert roots <= {"__future__", "collections", "inspect", "math", "numbers", "typing"}, roots
