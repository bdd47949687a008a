"""funcbo's errors: one base class (a ValueError), each exported at the top level."""

import pytest

import funcbo
from funcbo import errors

NAMES = ["ShapeError", "EmptyBatchError", "NonFiniteLossError", "NotStronglyConvexError"]


@pytest.mark.parametrize("name", NAMES)
def test_every_error_is_a_bilevel_error_and_a_value_error(name):
    cls = getattr(errors, name)
    assert getattr(funcbo, name) is cls
    assert issubclass(cls, funcbo.BilevelError) and issubclass(cls, ValueError)
    with pytest.raises(funcbo.BilevelError, match="the cause"):
        raise cls("the cause")


def test_the_errors_are_distinct():
    classes = [getattr(errors, n) for n in NAMES]
    assert not any(issubclass(a, b) for a in classes for b in classes if a is not b)
