"""The arena under load on loopback, with the server killed (SIGKILL) mid-way and restarted:
every acknowledged vote is stored exactly once, with the vote that was sent."""

from __future__ import annotations

import pytest

from prefgym.web.loadtest import run_load


def _check(result, clients, votes):
    assert result["errors"] == []
    # the kill happened mid-way: once half the votes were acknowledged (a few more may be
    # acknowledged between that ack and the kill), with votes still to come
    assert clients * votes // 2 <= result["killed_after_acks"] < clients * votes - clients
    assert result["retries"] > 0  # clients did hit the dead server and retried
    assert result["acknowledged"] == clients * votes
    assert result["stored"] == result["stored_distinct_keys"] == result["acknowledged"]
    assert result["lost"] == 0 and result["wrong"] == 0


def test_votes_survive_kill_9_small(tmp_path):
    _check(run_load(tmp_path, n_clients=4, n_votes=50, timeout=120), 4, 50)


@pytest.mark.slow
def test_votes_survive_kill_9_20_clients_500_votes(tmp_path):
    result = run_load(tmp_path, n_clients=20, n_votes=500, timeout=600)
    print(result)
    _check(result, 20, 500)
