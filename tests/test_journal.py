"""The append-only journal: framed records, group sync, a torn or corrupt tail cut off, appends after it."""

from __future__ import annotations

import os

import pytest

from flora.broker.journal import MAX_KEY, Journal, good_length, scan


def records(path):
    return [(r.kind, r.key, r.payload) for r in scan(path)]


def test_records_come_back_in_order_and_one_sync_covers_many_appends(tmp_path):
    j = Journal(tmp_path / "spool" / "j.log").open()
    items = [(1, f"dev{i}", os.urandom(i * 37)) for i in range(20)] + [(2, "", b""), (255, "ü-client", b"x")]
    for kind, key, payload in items:
        j.append(kind, key, payload)
    assert j.unsynced == len(items) and j.syncs == 0
    j.sync()
    j.sync()  # nothing new: no second flush
    assert j.unsynced == 0 and j.syncs == 1
    assert records(j.path) == items and [r[:3] for r in j.records()] == items
    j.close()
    again = Journal(j.path).open()  # reopened: appends go after the existing records
    again.append(3, "late", b"tail")
    again.close()
    assert records(j.path) == [*items, (3, "late", b"tail")]
    assert list(scan(tmp_path / "absent.log")) == []


@pytest.mark.parametrize("damage", ["torn", "flipped"])
def test_a_torn_or_corrupt_record_ends_the_journal_and_is_cut_off_on_open(tmp_path, damage):
    path = tmp_path / "j.log"
    j = Journal(path).open()
    for i in range(3):
        j.append(1, f"c{i}", bytes([i]) * 1000)
    j.close()
    size = path.stat().st_size
    data = bytearray(path.read_bytes())
    if damage == "torn":  # a crash in the middle of the last write
        data = data[: size - 10]
    else:  # a bit flipped in the last payload
        data[-500] ^= 0x01
    path.write_bytes(bytes(data))
    assert [r[1] for r in records(path)] == ["c0", "c1"]
    good = good_length(path)
    assert good < len(data)
    j = Journal(path).open()  # cuts the bad tail, then appends after the last good record
    assert path.stat().st_size == good
    j.append(1, "c3", b"new")
    j.close()
    assert [r[1] for r in records(path)] == ["c0", "c1", "c3"]


def test_bad_arguments_are_refused_before_anything_is_written(tmp_path):
    j = Journal(tmp_path / "j.log").open()
    with pytest.raises(ValueError):
        j.append(256, "k", b"")
    with pytest.raises(ValueError):
        j.append(1, "k" * (MAX_KEY + 1), b"")
    j.close()
    assert (tmp_path / "j.log").stat().st_size == 0
