"""The id ledger (state/ids): an id is held while its job runs or has a result,
and is free again once a person removed the result."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from sbrender.spool import FileInfo, Spool


@pytest.fixture
def spools(tmp_path: Path) -> tuple[Spool, Spool]:
    """Two daemons (owners) sharing one spool."""
    one = Spool(tmp_path / "inbox", tmp_path / "outbox", tmp_path / "state", owner="host-1-1")
    two = Spool(tmp_path / "inbox", tmp_path / "outbox", tmp_path / "state", owner="host-2-2")
    one.prepare()
    two.prepare()
    return one, two


def claimed(spool: Spool, name: str, text: str = "prompt: a cat\n") -> str:
    """A job file claimed into ``spool``'s work folder; its claim token."""
    path = spool.work / name
    path.write_text(text)
    info = FileInfo.of(path)
    assert info is not None
    return info.claim_token


def archived(spool: Spool, name: str) -> None:
    spool.archive(spool.work / name, ok=True)


def ids_folder(spool: Spool) -> list[str]:
    return sorted(os.listdir(spool.ids))


def test_an_id_is_held_while_its_job_runs_or_has_a_result_then_is_free(spools: tuple[Spool, Spool]) -> None:
    one, two = spools
    first = claimed(one, "cat.yaml")
    assert one.reserve("cat", first)
    assert one.reserve("cat", first), "the same file after a crash keeps its id"
    second = claimed(two, "cat.json", "prompt: another cat\n")
    assert not two.reserve("cat", second), "the first file is running: the id is held"
    one.result_path("cat").write_text("{}")
    archived(one, "cat.yaml")
    assert one.ledger.in_use("cat")
    assert not two.reserve("cat", second), "the id has a result: it is held"
    assert one.ledger.holder("cat") == first

    one.result_path("cat").unlink()  # a person clears the outbox
    assert not one.ledger.in_use("cat")
    assert two.reserve("cat", second)
    assert one.ledger.holder("cat") == second
    assert not one.reserve("cat", first), "the old file lost the id to the new one"
    assert [n for n in ids_folder(one) if n != ".lock"] == ["cat"]  # no temp file, nothing left aside


@pytest.mark.parametrize("where", ["own folder", "state/work itself"])
def test_a_claimed_file_holds_its_id_until_it_is_put_back(spools: tuple[Spool, Spool], where: str) -> None:
    """A stopped daemon puts its file back into the inbox; another file may take
    the id meanwhile. Files claimed by older versions sit in state/work/ itself."""
    one, two = spools
    folder = one.work if where == "own folder" else one.works
    (folder / "cat.yaml").write_text("prompt: a cat\n")
    info = FileInfo.of(folder / "cat.yaml")
    assert info is not None and one.reserve("cat", info.claim_token)
    other = claimed(two, "cat.json", "prompt: a dog\n")
    assert not two.reserve("cat", other)
    one.unclaim(folder / "cat.yaml")
    assert two.reserve("cat", other)


def test_an_empty_reservation_is_stale(spools: tuple[Spool, Spool]) -> None:
    one, _ = spools
    (one.ids / "cat").write_bytes(b"")
    token = claimed(one, "cat.yaml")
    assert one.reserve("cat", token)
    assert one.ledger.holder("cat") == token


def test_a_stale_reservation_taken_over_meanwhile_is_not_taken_twice(spools: tuple[Spool, Spool],
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Daemon one judges the reservation stale; before it replaces it, daemon two
    takes it over for a running file. One must then lose, not replace two's."""
    one, two = spools
    old = claimed(one, "old.yaml")
    assert one.reserve("cat", old)
    archived(one, "old.yaml")  # finished; its result then removed (never written here)
    mine, theirs = claimed(one, "cat.yaml"), claimed(two, "cat.json", "prompt: a dog\n")
    is_live = one.ledger.is_live

    def two_first(job_id: str, token: str) -> bool:
        live = is_live(job_id, token)
        if token == old and not two.ledger.holder("cat") == theirs:
            assert two.reserve("cat", theirs)  # two wins between one's look and one's move
        return live

    monkeypatch.setattr(one.ledger, "is_live", two_first)
    assert not one.reserve("cat", mine)
    assert one.ledger.holder("cat") == theirs


@pytest.mark.parametrize("attempt", range(20))
def test_two_daemons_racing_for_a_stale_id_one_wins(spools: tuple[Spool, Spool], attempt: int) -> None:
    one, two = spools
    old = claimed(one, "old.yaml")
    assert one.reserve("cat", old)
    archived(one, "old.yaml")
    tokens = {one: claimed(one, "cat.yaml"), two: claimed(two, "cat.json", "prompt: a dog\n")}
    start = threading.Barrier(2)
    won: dict[Spool, bool] = {}

    def race(spool: Spool) -> None:
        start.wait()
        won[spool] = spool.reserve("cat", tokens[spool])

    threads = [threading.Thread(target=race, args=(s,)) for s in (one, two)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [s for s, ok in won.items() if ok]
    assert len(winners) == 1, won
    assert one.ledger.holder("cat") == tokens[winners[0]]


def test_release_gives_back_only_the_reservation_asked_for(spools: tuple[Spool, Spool]) -> None:
    one, two = spools
    first = claimed(one, "cat.yaml")
    assert one.reserve("cat", first)
    assert not one.ledger.release("cat", "1-2")
    assert one.ledger.holder("cat") == first
    assert one.ledger.release("cat", first)
    assert not os.path.lexists(one.ids / "cat")
    assert not one.ledger.release("dog", first)


def test_a_reservation_is_one_link_holding_the_token_and_a_plain_file_of_earlier_versions_counts(
        spools: tuple[Spool, Spool]) -> None:
    one, two = spools
    token = claimed(one, "cat.yaml")
    assert one.reserve("cat", token, sync=False)
    assert os.readlink(one.ids / "cat") == token  # created whole in one call: nothing to flush, no temp file
    assert [n for n in ids_folder(one) if n != ".lock"] == ["cat"]
    older = claimed(one, "dog.yaml", "prompt: a dog\n")
    (one.ids / "dog").write_text(older)  # as versions before this one wrote it
    assert one.ledger.holder("dog") == older
    mine = claimed(two, "dog.json", "prompt: another dog\n")
    assert not two.reserve("dog", mine), "an earlier version's live reservation holds the id"
    archived(one, "dog.yaml")
    assert two.reserve("dog", mine), "and once stale, it is taken over"
    assert os.readlink(one.ids / "dog") == mine
