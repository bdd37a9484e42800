"""bench.bytecodes counts the opcodes code runs while started, by code object, and reports them
per request."""

from __future__ import annotations

import collections
import sys
from pathlib import Path

import pytest

from bench.bytecodes import Counter, per_request, write_markdown
from proxy import h1

KEY = "test_bench_bytecodes.py:_work"
Pair = collections.namedtuple("Pair", "a b")


def _work(n: int) -> int:
    total = 0
    for i in range(n):
        total += i
    return total


@pytest.mark.skipif(sys.gettrace() is not None, reason="a tracer (coverage, a debugger) is already set")
def test_counts_grow_with_the_work_done_and_stop_when_stopped() -> None:
    counter = Counter()
    counter.start()
    _work(10)
    ten = counter.stop()
    counter.start()
    _work(30)
    thirty = counter.stop()
    _work(100)  # not counted
    assert ten[KEY] > 0
    per_turn = (thirty[KEY] - ten[KEY]) / 20
    assert per_turn >= 3 and per_turn == int(per_turn)  # the same opcodes each turn of the loop
    assert counter.counts[KEY] == thirty[KEY]
    assert sys.gettrace() is None


@pytest.mark.skipif(sys.gettrace() is not None, reason="a tracer (coverage, a debugger) is already set")
def test_code_made_by_exec_is_named_by_its_class() -> None:
    """Every dataclass __init__ and named tuple __new__ comes from exec as "<string>": each class's
    is counted apart, under its name."""
    counter = Counter()
    counter.start()
    for _ in range(3):
        h1.Request(b"GET", b"/", [])
        h1.Data(b"x")
        Pair(1, 2)
    counts = counter.stop()
    names = {name for name in counts if name.startswith("<string>")}
    assert "<string>:proxy.h1.Request.__init__" in names, names
    assert "<string>:proxy.h1.Data.__init__" in names, names
    assert f"<string>:{__name__}.Pair.<lambda>" in names, names
    assert counts["<string>:proxy.h1.Request.__init__"] > counts["<string>:proxy.h1.Data.__init__"]


def test_per_request_is_what_each_further_request_cost(tmp_path: Path) -> None:
    """Counts of both windows include a fixed cost (new connections): it drops out."""
    short = ({"setup": 500, "a": 300, "b": 100}, 100)
    long = ({"setup": 500, "a": 1200, "b": 400, "c": 30}, 400)
    client = per_request(short, long, 2)
    assert client == {"requests": [100, 400], "bytecodes_per_request": 4.1, "top": [["a", 3.0], ["b", 1.0]]}
    server = per_request(({"c": 100}, 10), ({"c": 700}, 310), 5)
    with pytest.raises(RuntimeError, match="no more requests"):
        per_request(long, short, 2)
    report = {
        "generated": "now",
        "commit": "abc",
        "cpu": "cpu",
        "seconds": [3, 9],
        "runs": {"HTTP": {"client": client, "server": server}},
    }
    write_markdown(tmp_path / "b.md", report)
    text = (tmp_path / "b.md").read_text()
    assert "| HTTP | 100 / 400 | 4 | 2 |" in text
    assert "| 3.0 | `a` |" in text
    assert "windows per run, of 3 s and 9 s" in text
