"""Limits as strings and as ``RateLimit``: what parses, what is refused at declaration."""

from __future__ import annotations

import pytest

from zeal_asgi.errors import ConfigError
from zeal_asgi.ratelimit import RateLimit
from zeal_asgi.ratelimit.rates import parse_limits


@pytest.mark.parametrize(
    ("text", "amount", "per"),
    [
        ("5/second", 5, 1),
        ("100/minute", 100, 60),
        ("1000 per 2 hours", 1000, 7200),
        ("10 per day", 10, 86400),
        ("3/5 minutes", 3, 300),
        ("7 PER 1 Month", 7, 30 * 86400),
        ("1/year", 1, 360 * 86400),
    ],
)
def test_limits_style_strings(text: str, amount: int, per: float) -> None:
    assert RateLimit.parse(text) == RateLimit(amount, per=per)


def test_several_limits_in_one_string_or_sequence() -> None:
    both = (RateLimit(10, per=1), RateLimit(1000, per=3600))
    assert parse_limits("10/second;1000/hour") == both
    assert parse_limits("10/second, 1000/hour") == both
    assert parse_limits(["10/second", RateLimit(1000, per=3600)]) == both


@pytest.mark.parametrize(
    "bad",
    ["", "100", "100/fortnight", "abc/minute", "0/minute", "-5/second", "5/0 seconds", "5.5/s"],
)
def test_unparseable_or_empty_limits_are_config_errors(bad: str) -> None:
    with pytest.raises(ConfigError):
        parse_limits(bad)


@pytest.mark.parametrize(
    ("amount", "per"), [(0, 60), (-1, 60), (1.5, 60), (True, 60), (10, 0), (10, -1), (10, "60")]
)
def test_zero_negative_or_mistyped_limits_are_refused(amount: object, per: object) -> None:
    with pytest.raises(ConfigError):
        RateLimit(amount, per=per)  # type: ignore[arg-type]


def test_str_and_window() -> None:
    assert str(RateLimit(100, per=60)) == "100 per 1 minute"
    assert str(RateLimit(5, per=7200)) == "5 per 2 hours"
    assert RateLimit(5, per=0.5).window == 1  # the header's w is whole seconds, at least 1
