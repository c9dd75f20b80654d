"""The one log renderer: logfmt with double quotes, control characters escaped, numbers
redacted in text, numbers as values kept; every call site through it."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest

from agent import logs
from tests.support.logfmt import problems


def assert_logfmt(line: str) -> None:
    """One quoting style: every field ``key=value`` or ``key="value"``, no single-quoted
    value, no raw control character."""
    assert problems(line) is None, (problems(line), line)


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    logs.configure("debug", stream)
    try:
        yield stream
    finally:
        root.handlers[:], root.level = saved


def lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def test_event_fields_render_as_logfmt_with_numbers_as_numbers(captured: io.StringIO) -> None:
    log = logs.get_logger("agent.test")
    log.info(
        "call_answered",
        recording_id="0123456789abcdef0123456789abcdef",
        employee="Aino Virtanen",
        customer="+358401234***",
        worker=3,
        status=171140,
        seconds=2.0,
        ok=True,
        missing=None,
    )
    [line] = lines(captured)
    assert_logfmt(line)
    assert line.endswith(
        "agent.test event=call_answered recording_id=0123456789abcdef0123456789abcdef "
        'employee="Aino Virtanen" customer=+358401234*** worker=3 status=171140 '
        "seconds=2.0 ok=true missing=-"
    )


@pytest.mark.parametrize("char", ["\x00", "\r", "\n", "\u2028", "\x1b", "\x7f", "\x85"])
def test_a_control_character_in_a_value_cannot_start_a_line(
    captured: io.StringIO, char: str
) -> None:
    log = logs.get_logger("agent.test")
    log.warning("spool_error", file=f"a{char}agent.test event=forged x=1", error=f"b{char}")
    [line] = captured.getvalue().split("\n")[:-1]  # no other split than the final newline
    assert_logfmt(line)
    assert line.count("event=") == 2 and "event=spool_error" in line  # the forged one quoted
    assert "level=warning" in line


def test_library_records_and_exceptions_use_the_same_renderer(captured: io.StringIO) -> None:
    logging.getLogger("grpc._cython").warning("it's 'quoted'\nsecond line %s", "x")
    log = logs.get_logger("agent.test")
    try:
        raise OSError("disk 'full'\r\n")
    except OSError:
        log.exception("write_failed", path="/tmp/x y")
    first, second = lines(captured)
    assert_logfmt(first)
    assert first.endswith(
        "grpc._cython level=warning event=log msg=\"it's 'quoted'\\nsecond line x\""
    )
    assert_logfmt(second)
    assert second.endswith(
        'level=error event=write_failed path="/tmp/x y" error="OSError: disk \'full\'\\r\\n"'
    )
    assert "Traceback" not in captured.getvalue()


def test_journald_prefix_instead_of_time_stamp(
    monkeypatch: pytest.MonkeyPatch, captured: io.StringIO
) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", "8:1234")
    logs.configure("info", captured)
    logs.get_logger("agent.test").error("boom", n=1)
    assert lines(captured) == ["<3>agent.test level=error event=boom n=1"]


def test_bad_event_or_field_names_are_refused() -> None:
    log = logs.get_logger("agent.test")
    with pytest.raises(ValueError, match="event name"):
        log.info("event=x key=%s")
    with pytest.raises(ValueError, match="field name 'Bad'"):
        log.info("x", Bad=1)


# ---------------------------------------------------------------- parsing logfmt


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ("x event=a k='v'", "single-quoted value of k"),
        ("x event=a msg=two words", "not key=value"),
        ("x k=1 event=a", "no event= first"),
        ('x event=a k="v\r"', "a raw control character"),
    ],
)
def test_the_checker_finds_what_breaks_logfmt(line: str, why: str) -> None:
    found = problems(line)
    assert found is not None and found.startswith(why)


def test_parse_logfmt_reads_what_the_renderer_writes() -> None:
    fields = {"a": "plain", "b": 'say "hi"\\ \n\r\t\x00\u2028', "c": 503, "d": "x=y"}
    parsed = logs.parse_logfmt(logs.render_fields(fields))
    assert parsed == fields


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "event=front_refused call_ref=ab status=503",
            {"event": "front_refused", "call_ref": "ab", "status": 503},
        ),
        ("worker=w0 n=0 big=0401234567", {"worker": "w0", "n": 0, "big": "0401234567"}),
        ("", {}),
        ("processes (at least): 9", None),
        ("a=b c", None),
        ('a="unterminated', None),
        ("A=b", None),
    ],
)
def test_parse_logfmt(text: str, expected: dict[str, object] | None) -> None:
    assert logs.parse_logfmt(text) == expected
