"""Kubernetes-style YAML is read as kubectl (go-yaml v2) reads it."""

from __future__ import annotations

import pytest

from sidemesh import kubeyaml


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("22:30", "22:30"),  # PyYAML: 1350 (base 60), go-yaml v2 has no base 60
        ("1:30", "1:30"),
        ("52:54:00:12:34:56", "52:54:00:12:34:56"),
        ("1:30.5", "1:30.5"),
        ("=", "="),  # PyYAML: the value tag, which no constructor takes (the whole file failed)
        ("2030-01-01", "2030-01-01"),  # PyYAML: a date; go-yaml keeps a string in plain values
        ("yes", True),
        ("off", False),
        # go-yaml v2's booleans and Go's number parsers, where PyYAML kept strings (defaultMode:
        # 0o440 came out of sidemesh inject as "0o440", which kubectl refuses)
        ("y", True),
        ("N", False),
        ("1e3", 1000.0),
        ("+.5", 0.5),
        ("08", 8.0),
        ("0o440", 288),
        ("0X1F", 31),
        ("0b101", 5),
        ("-017", -15),
        ("017", 15),
        # not numbers: a prefix without digits (PyYAML's pattern took them and int() crashed)
        ("0x_", "0x_"),
        # wider than 64 bits: go-yaml keeps hex/octal/binary text, reads decimal digits as a float
        ("0x1234567890abcdef1234", "0x1234567890abcdef1234"),
        ("18446744073709551615", 18446744073709551615),
        ("18446744073709551616", 1.8446744073709552e19),
        ("0b_", "0b_"),
        ("1e", "1e"),
        ("0x1F", 31),
        ("1_000", 1000),
        ("-2", -2),
        ("1.5", 1.5),
        (".inf", float("inf")),
        ("null", None),
        ("8080", 8080),
        ("/a:1", "/a:1"),
    ],
)
def test_plain_scalars_read_as_kubectl_reads_them(text: str, value: object) -> None:
    assert kubeyaml.load(f"v: {text}\n") == {"v": value}


def test_every_document_and_quoted_values_as_they_are() -> None:
    docs = kubeyaml.load_all("a: '22:30'\n---\nb: \"=\"\n---\n")
    assert docs == [{"a": "22:30"}, {"b": "="}, None]


@pytest.mark.parametrize(
    "text",
    [
        "0b" + "1" * 16000 + "x",
        "0x" + "f" * 16000 + "x",
        "." + "1" * 16000 + "x",
        "1e" + "1" * 16000 + "x",
    ],
)
def test_scalars_resolve_in_linear_time(text: str) -> None:
    """`[01_]*[01][01_]*` and its kin backtracked quadratically: 0.9 s (binary, hex) and 4.4 s (a
    fraction) for 16,000 digits, on the injector's event loop when it reloads its settings."""
    import time

    started = time.perf_counter()
    assert kubeyaml.load(f"a: {text}") == {"a": text}
    assert time.perf_counter() - started < 0.1


def test_numbers_beyond_every_range_stay_text() -> None:
    """5,000 digits raised Python's integer conversion limit (`sidemesh inject` said "internal
    error"); 400 decimal digits became inf. go-yaml keeps both as strings (ParseFloat's range error)."""
    assert kubeyaml.load("a: " + "1" * 5000) == {"a": "1" * 5000}
    assert kubeyaml.load("a: " + "1" * 400) == {"a": "1" * 400}
    assert kubeyaml.load("a: 18446744073709551616") == {"a": 18446744073709551616.0}  # (2^64: a float)
