"""The durable outbox: persistence, acks, resume/renumbering, the cap, a full disk."""

from __future__ import annotations

import json
import random
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent_stub import protocol as P
from agent_stub.outbox import Outbox


def tel(n: int, points: int = 1) -> dict[str, Any]:
    return P.telemetry(None, [[1_700_000_000_000 + n, "test.n", n]] * points)


def ids(frames: list[Any]) -> list[Any]:
    """What each frame carries: the test number of a telemetry frame, or the type."""
    out = []
    for f in frames:
        frame = json.loads(f.text) if hasattr(f, "text") else f
        out.append(frame["points"][0][2] if frame["type"] == "telemetry" else frame["type"])
    return out


def test_frames_and_seq_counter_persist_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite"
    box = Outbox(path)
    for n in range(5):
        box.append(tel(n))
    sent = box.take(3)
    assert [f.seq for f in sent] == [1, 2, 3]
    assert json.loads(sent[0].text)["seq"] == 1
    box.ack(2)
    box.close()

    box = Outbox(path)
    assert box.buffered == 3 and box.last_seq == 3
    box.append(tel(5))
    # Reconnect: the server committed up to 2, so everything else is (re)sent from 3.
    assert [(f.seq, n) for f, n in zip(box.resume_from(2), ids(box.in_flight()), strict=True)] == \
        [(3, 2), (4, 3), (5, 4), (6, 5)]
    box.close()


def test_ack_deletes_frames_up_to_seq(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite")
    for n in range(6):
        box.append(tel(n, points=10))
    box.take(6)
    assert box.ack(4) == 4
    assert box.acked_points_total == 40
    assert ids(box.in_flight()) == [4, 5]
    assert box.ack(2) == 0  # a late, smaller ack changes nothing
    assert box.ack(6) == 2 and box.buffered == 0


def test_resume_from_drops_acked_frames_and_returns_the_rest_in_order() -> None:
    box = Outbox()
    for n in range(5):
        box.append(tel(n))
    box.take(5)
    rest = box.resume_from(3)
    assert [f.seq for f in rest] == [4, 5] and ids(rest) == [3, 4]
    box.append(tel(5))
    assert [f.seq for f in box.take(10)] == [6]


def test_seq_continues_after_the_servers_last_acked_when_the_server_is_ahead() -> None:
    box = Outbox()  # e.g. the state dir was restored from an old backup
    box.append(tel(0))
    box.append(tel(1))
    box.take(1)
    rest = box.resume_from(41)
    assert [f.seq for f in rest] == [42, 43] and ids(rest) == [0, 1]  # nothing deleted, moved forward
    box.append(tel(2))
    assert [f.seq for f in box.take(1)] == [44]


def test_cap_drops_oldest_telemetry_first_and_counts_frames_and_points() -> None:
    box = Outbox(max_frames=4)
    box.append(P.state(None, {}, {}))
    box.append(tel(0, points=3))
    box.append(P.command_result(None, "c1", True, ""))
    box.append(tel(1, points=5))
    box.append(P.event(None, []))
    assert box.buffered == 4
    assert ids(box.take(10)) == ["state", "command.result", 1, "event"]
    assert (box.dropped_frames, box.dropped_points) == (1, 3)
    assert [f.seq for f in box.in_flight()] == [1, 2, 3, 4]  # no hole: the dropped frame had no number


def test_cap_drops_other_kinds_only_when_no_telemetry_is_left() -> None:
    box = Outbox(max_frames=2)
    box.append(P.state(None, {}, {}))
    box.append(P.command_result(None, "c1", True, ""))
    box.append(P.command_result(None, "c2", True, ""))
    assert box.buffered == 2 and box.dropped_frames == 1
    assert [json.loads(f.text)["command_id"] for f in box.take(5)] == ["c1", "c2"]


def test_byte_cap_is_enforced_too() -> None:
    box = Outbox(max_bytes=2000)
    for n in range(20):
        box.append(tel(n, points=5))
    assert box.buffered_bytes <= 2000 and box.dropped_frames > 0
    assert ids(box.take(100)) == list(range(20 - box.buffered, 20))


def test_drop_counters_persist(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite", max_frames=1)
    box.append(tel(0, points=7))
    box.append(tel(1, points=2))
    box.close()
    assert Outbox(tmp_path / "o.sqlite").dropped_points == 7


def test_numbered_frames_are_not_dropped_while_online() -> None:
    box = Outbox(max_frames=3)
    box.set_online(True)
    for n in range(3):
        box.append(tel(n))
    box.take(2)  # 0 and 1 are in flight, maybe already committed by the server
    box.append(tel(3))
    assert ids(box.in_flight()) == [0, 1]  # the oldest *unsent* telemetry (2) went instead
    assert ids(box.take(5)) == [3]
    assert [f.seq for f in box.in_flight()] == [1, 2, 3]


def test_offline_drops_of_numbered_frames_are_renumbered_on_resume_without_a_hole() -> None:
    box = Outbox(max_frames=3)
    box.set_online(True)
    for n in range(3):
        box.append(tel(n))
    box.take(3)  # seq 1..3 sent, then the link dies before any ack
    box.set_online(False)
    box.append(tel(3))  # the cap drops telemetry 0 (seq 1): a hole while offline
    assert [f.seq for f in box.in_flight()] == [2, 3]
    rest = box.resume_from(0)  # the server had committed nothing
    assert [f.seq for f in rest] == [1, 2, 3] and ids(rest) == [1, 2, 3]


def test_a_frame_the_server_refused_is_removed_and_the_rest_renumbered_after_the_gap() -> None:
    box = Outbox()
    for n in range(4):
        box.append(tel(n))
    box.take(4)
    assert box.drop_rejected(2)
    # The server then reports seq_gap expected=2 for frame 3: renumber from there.
    rest = box.resume_from(1)
    assert [f.seq for f in rest] == [2, 3] and ids(rest) == [2, 3]


def test_a_full_disk_drops_oldest_telemetry_and_never_corrupts_the_outbox(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite"
    box = Outbox(path, min_free_bytes=0)  # no free-space guard: it would reset the limit set below
    box.append(P.state(None, {"agent": "1"}, {}))
    box.append(P.command_result(None, "keep-me", True, "x" * 100))
    pages = box._db.execute("PRAGMA page_count").fetchone()[0]
    # A tiny database limit behaves like a full disk: SQLITE_FULL on the next big write.
    # (tests/reliability/test_faults_agent.py fills a real filesystem instead.)
    box._db.execute(f"PRAGMA max_page_count = {pages + 12}")
    stored = []
    for n in range(60):
        if box.append(tel(n, points=60)) is not None:
            stored.append(n)
    assert box.dropped_frames > 0
    assert box.buffered == len(box.in_flight()) + box.unsent_count
    box.close()

    box = Outbox(path)
    assert box._db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    frames = box.take(1000)
    kinds = ids(frames)
    assert kinds[:2] == ["state", "command.result"]  # the durable non-telemetry frames survived
    assert kinds[2:] == sorted(kinds[2:]) and kinds[-1] == 59  # newest kept, oldest dropped
    assert box.dropped_frames + len(kinds) - 2 == 60
    assert [f.seq for f in frames] == list(range(1, len(frames) + 1))


def test_the_outbox_leaves_min_free_bytes_of_the_disk_free_by_dropping_its_oldest_telemetry(tmp_path: Path) -> None:
    # Ask for more free space than this disk has: the database may not grow at all, so
    # SQLite says "full" (before the filesystem would) and the oldest telemetry makes room.
    import os

    st = os.statvfs(tmp_path)
    box = Outbox(tmp_path / "o.sqlite", min_free_bytes=st.f_bavail * st.f_frsize + 2**30)
    box.append(P.command_result(None, "keep-me", True, "ok"))
    pages = box._db.execute("PRAGMA page_count").fetchone()[0]
    refused = [n for n in range(200) if box.append(tel(n, points=50)) is None]
    assert refused == [] and box.dropped_frames > 0
    assert box._db.execute("PRAGMA page_count").fetchone()[0] == pages  # not one page more
    kinds = ids(box.take(1000))
    assert kinds[0] == "command.result" and kinds[1:] == list(range(box.dropped_frames, 200))


def test_a_reserve_file_is_held_next_to_the_database_and_not_for_memory_outboxes(tmp_path: Path) -> None:
    Outbox(tmp_path / "o.sqlite", reserve_bytes=256 * 1024).close()
    assert (tmp_path / "o.sqlite.reserve").stat().st_blocks * 512 >= 256 * 1024  # allocated, not sparse
    Outbox(":memory:").close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.sqlite", "o.sqlite.reserve"]


def test_in_memory_outbox_for_benchmarks() -> None:
    box = Outbox(":memory:")
    box.append(tel(1))
    assert box.take(1)[0].seq == 1
    box.close()


def test_appending_a_non_durable_type_is_refused() -> None:
    with pytest.raises(ValueError, match="durable"):
        Outbox().append(P.heartbeat(1, 1, 1))


# --- the numbering rules against a model server, with random loss --------------------
class ModelServer:
    """The contract's server side in miniature: commits in order, acks, reports gaps."""

    def __init__(self) -> None:
        self.last_acked = 0
        self.committed: list[Any] = []

    def receive(self, text: str) -> dict[str, Any]:
        frame = json.loads(text)
        seq = frame["seq"]
        if seq <= self.last_acked:
            return P.ack(seq, 0)
        if seq > self.last_acked + 1:
            return P.error("seq_gap", "gap", expected=self.last_acked + 1)
        self.last_acked = seq
        self.committed.append(ids([frame])[0] if frame["type"] == "telemetry" else frame["command_id"])
        return P.ack(seq, 1)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(["tel", "tel", "cmd", "connect", "send", "deliver", "deliver", "recv", "recv",
                                 "lose_down", "ignore_up", "timeout", "disconnect"]), max_size=150),
       st.integers(0, 2**32))
def test_random_outages_never_lose_duplicate_or_reorder_frames(ops: list[str], seed: int) -> None:
    rnd = random.Random(seed)
    box = Outbox(max_frames=rnd.choice([3, 5, 1000]))
    server = ModelServer()
    up: list[str] = []  # agent → server, in order
    down: list[dict[str, Any]] = []  # server → agent, in order
    online = False
    produced: list[Any] = []
    window = rnd.choice([1, 2, 8])

    def connect() -> None:
        nonlocal online
        up.clear()
        down.clear()
        box.resume_from(server.last_acked, limit=0)  # the welcome
        box.set_online(True)
        online = True

    def step(op: str) -> None:
        nonlocal online
        if op == "tel":
            produced.append(len(produced))
            box.append(tel(produced[-1]))
        elif op == "cmd":
            produced.append(f"c{len(produced)}")
            box.append(P.command_result(None, produced[-1], True, ""))
        elif op == "connect" and not online:
            connect()
        elif op == "send" and online:
            up.extend(f.text for f in box.take(window - box.in_flight_count))
        elif op == "deliver" and up:
            down.append(server.receive(up.pop(0)))
        elif op == "recv" and down:
            msg = down.pop(0)
            if msg["type"] == "ack":
                box.ack(msg["seq"])
            else:
                box.resume_from(msg["expected"] - 1, limit=0)
        elif op == "timeout" and online:
            up.extend(f.text for f in box.in_flight())
        elif op == "ignore_up" and up:
            up.pop(0)  # the server skipped a frame (say, rate limited): later ones are gaps
        elif op == "lose_down" and down:
            down.pop(0)  # an ack lost with the connection...
            step("disconnect")
        elif op == "disconnect" and online:
            online = False
            up.clear()
            down.clear()
            box.set_online(False)

    for op in ops:
        step(op)
    # Finally a good long connection drains everything.
    if not online:
        connect()
    for _ in range(10_000):
        if box.buffered == 0 and not up and not down:
            break
        if not up and not down and box.in_flight_count:
            up.extend(f.text for f in box.in_flight())  # the agent's ack timeout: resend in flight
        step("send")
        step("deliver")
        step("recv")
    assert box.buffered == 0
    assert len(server.committed) == len(set(server.committed)), "a frame was committed twice"
    order = {v: i for i, v in enumerate(produced)}
    assert [order[v] for v in server.committed] == sorted(order[v] for v in server.committed), "reordered"
    assert len(server.committed) + box.dropped_frames == len(produced), "a frame vanished without being counted"
    if box.max_frames == 1000:  # no cap pressure: every frame arrives, exactly once, in order
        assert server.committed == produced


def test_other_sqlite_errors_propagate_and_leave_nothing_behind(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite")
    box._db.execute("CREATE TRIGGER boom BEFORE INSERT ON frames BEGIN SELECT RAISE(ABORT, 'boom'); END")
    with pytest.raises(sqlite3.IntegrityError, match="boom"):
        box.append(tel(1))
    assert box.buffered == 0 and not box._db.in_transaction


def test_a_frame_dropped_offline_that_the_server_had_committed_is_not_counted_as_lost() -> None:
    box = Outbox(max_frames=2)
    box.set_online(True)
    box.append(tel(0, points=4))
    box.append(tel(1, points=4))
    box.take(2)  # both sent; the server commits seq 1, then the link dies before the ack
    box.set_online(False)
    box.append(tel(2, points=4))  # full: drops seq 1 (telemetry 0)
    assert (box.dropped_frames, box.dropped_points) == (1, 4)
    assert ids(box.resume_from(1)) == [1, 2]  # the welcome says 1 was committed after all
    assert (box.dropped_frames, box.dropped_points) == (0, 0)
