"""bench.instructions: what it reads from callgrind_annotate, the load it drives, its refusals."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from bench import instructions

ANNOTATED = """\
--------------------------------------------------------------------------------
Ir
--------------------------------------------------------------------------------
700,866,649 (100.0%)  PROGRAM TOTALS

--------------------------------------------------------------------------------
Ir                      file:function
--------------------------------------------------------------------------------
700,866,649 (100.0%)  /project/build/libuv/src/unix/core.c:uv_run [/x/loop.so]
132,298,080 (18.88%)  /project/httptools/parser/parser.c:__pyx_pw_9httptools_6parser_6parser_10HttpParser_13feed_data [/x/parser.so]
 56,363,876 ( 8.04%)  /tmp/Python-3.11.7/Objects/typeobject.c:type_call [/x/libpython3.11.so.1.0]
  1,000,000 ( 0.14%)  /tmp/Python-3.11.7/Objects/typeobject.c:type_call'2 [/x/libpython3.11.so.1.0]
 28,466,987 ( 4.02%)  /tmp/Python-3.11.7/Modules/clinic/_ssl.c.h:_ssl__SSLSocket_write [/x/_ssl.so]
"""


def test_the_total_and_the_parts_are_read_off_the_annotated_output() -> None:
    assert instructions.program_total(ANNOTATED) == 700_866_649
    parts = dict(instructions.PARTS)
    feed = parts["llhttp parsing and its callbacks into Python (feed_data)"]
    assert instructions.inclusive(ANNOTATED, feed) == 132_298_080
    built = parts["objects built by calling a class (type_call)"]
    assert instructions.inclusive(ANNOTATED, built) == 56_363_876  # (not the recursive entry's)
    reads = parts["OpenSSL reads (SSLObject.read)"]
    assert instructions.inclusive(ANNOTATED, reads) == 0  # (absent: none counted)
    with pytest.raises(ValueError, match="PROGRAM TOTALS"):
        instructions.program_total(ANNOTATED.replace("PROGRAM TOTALS", "something else"))


def test_the_report_has_both_sidecars_figures(tmp_path: Path) -> None:
    figures = {
        role: {
            "requests": 3200,
            "instructions_per_request": n,
            "parts": {label: n / 10 for label, _ in instructions.PARTS},
        }
        for role, n in (("client", 219_584.0), ("server", 195_935.0))
    }
    report = {"generated": "now", "commit": "abc", "cpu": "cpu", "requests": 3200, "sidecars": figures}
    instructions.write_markdown(tmp_path / "i.md", report)
    text = (tmp_path / "i.md").read_text()
    assert "| instructions per request | 219,584 | 195,935 |" in text
    assert "(feed_data) | 21,958 | 19,594 |" in text


async def test_the_load_is_every_request_over_keep_alive_connections_and_checks_each_answer() -> None:
    heads: list[bytes] = []
    connections = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        while True:
            try:
                heads.append(await reader.readuntil(b"\r\n\r\n"))
            except asyncio.IncompleteReadError:
                break
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
                if len(heads) < 40
                else b"HTTP/1.1 503 x\r\n\r\n"
            )
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        await instructions.drive("127.0.0.1", port, 37, connections=4)
        assert len(heads) == 37 and connections == 4
        with pytest.raises(RuntimeError, match="unexpected response head"):
            await instructions.drive("127.0.0.1", port, 8, connections=2)


def test_it_refuses_what_it_cannot_count(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SystemExit, match="at least 16"):
        instructions.main(["--requests", "3"])
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(SystemExit, match="apt-get install valgrind"):
        instructions.main([])


def test_results_are_written_as_json_and_a_page(tmp_path: Path) -> None:
    import json

    from bench.common import write_results

    page = write_results(
        tmp_path / "out", "x", {"a": 1}, lambda path, report: path.write_text(f"a={report['a']}")
    )
    assert page == tmp_path / "out" / "x.md" and page.read_text() == "a=1"
    assert json.loads((tmp_path / "out" / "x.json").read_text()) == {"a": 1}
