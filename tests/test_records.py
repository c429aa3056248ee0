from __future__ import annotations

import pytest

from asyncraft import records
from asyncraft.errors import ConfigError
from asyncraft.failpoints import Failpoints


def test_round_trip_and_checksum_detects_every_single_bit_flip() -> None:
    line = records.encode({"seq": 7, "k": "done", "id": "ab" * 16, "message": {"content": "héllo"}})
    assert line.endswith(b"\n")
    assert records.decode(line) == {"seq": 7, "k": "done", "id": "ab" * 16, "message": {"content": "héllo"}}
    for i in range(len(line) - 1):
        for bit in range(8):
            damaged = bytearray(line)
            damaged[i] ^= 1 << bit
            assert records.decode(bytes(damaged)) is None, (i, bit)


def test_every_truncation_is_rejected() -> None:
    line = records.encode({"seq": 1, "k": "input", "total": 3})
    for cut in range(len(line) - 1):
        assert records.decode(line[:cut]) is None


def test_content_id_ignores_key_order_and_sees_every_value() -> None:
    a = records.content_id("prompts", {"model": "m", "messages": [{"role": "user", "content": "x"}]})
    b = records.content_id("prompts", {"messages": [{"content": "x", "role": "user"}], "model": "m"})
    c = records.content_id("prompts", {"messages": [{"content": "x", "role": "user"}], "model": "n"})
    assert a == b != c and len(a) == 32


def test_scrub_removes_the_key() -> None:
    assert records.scrub("bad key test-key-abcdef123 given", "test-key-abcdef123") == "bad key *** given"


def test_failpoint_spec_is_validated() -> None:
    with pytest.raises(ConfigError, match="unknown failpoint"):
        Failpoints("journal.nope")
    with pytest.raises(ConfigError, match="unknown action"):
        Failpoints("journal.write=boom")
    fp = Failpoints("journal.write=enospc@2")
    fp.hit("journal.write")
    with pytest.raises(OSError, match="No space left"):
        fp.hit("journal.write")
    fp.hit("journal.write")  # fires once unless '@N+'
