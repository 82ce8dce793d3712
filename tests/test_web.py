"""The human side: annotation page and arena, driven through their JSON API and HTML pages."""

from __future__ import annotations

import pytest
import typer
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from prefgym.annotators.analysis import load_cross_annotations
from prefgym.errors import DataError
from prefgym.evaluation import load_battles
from prefgym.io import read_records, write_json
from prefgym.web import annotation_app, arena_app


def _pairs(n=6):
    return [{"instruction": f"Say {i}.", "input": "", "output_1": f"first answer {i}",
             "output_2": f"second answer {i}", "generator_1": "m1", "generator_2": "m2"} for i in range(n)]


@pytest.fixture
def pairs_file(tmp_path):
    path = tmp_path / "pairs.json"
    write_json(path, _pairs())
    return path


def _label_all(client, labeler, pairs, pick="output_2"):
    """Label every pair offered to `labeler`, always choosing the side that shows `pick`."""
    seen = []
    while True:
        nxt = client.get("/api/next", params={"labeler": labeler}).json()
        if nxt["index"] is None:
            return seen
        p = pairs[nxt["index"]]
        assert {nxt["left"], nxt["right"]} == {p["output_1"], p["output_2"]}
        choice = "left" if nxt["left"] == p[pick] else "right"
        r = client.post("/api/label", json={"labeler": labeler, "index": nxt["index"], "choice": choice})
        assert r.status_code == 200, r.text
        seen.append(nxt["index"])


def test_swap_is_undone_and_labels_are_cross_annotations(pairs_file, tmp_path):
    out = tmp_path / "labels.jsonl"
    client = TestClient(annotation_app(pairs_file, out))
    sides = set()
    for idx in range(6):
        nxt = client.get("/api/next", params={"labeler": "ann"}).json()
        sides.add(nxt["left"] == _pairs()[nxt["index"]]["output_2"])
        choice = "left" if nxt["left"] == _pairs()[nxt["index"]]["output_2"] else "right"
        client.post("/api/label", json={"labeler": "ann", "index": nxt["index"], "choice": choice})
    assert sides == {True, False}  # both orders were shown, so the undoing was exercised
    rows = read_records(out)
    assert len(rows) == 6 and sorted(r["index"] for r in rows) == list(range(6))
    assert all(r["preference"] == 2 and r["annotator"] == "ann" for r in rows)
    for r in rows:
        p = _pairs()[r["index"]]
        assert (r["instruction"], r["output_1"], r["output_2"]) == (p["instruction"], p["output_1"], p["output_2"])
        assert r["time_per_example"] >= 0
    assert [r["preference"] for r in load_cross_annotations(out)] == [2.0] * 6
    # a tie is 1.5, and a labeler who always picks output_1 gets 1 everywhere
    out2 = tmp_path / "labels2.jsonl"
    client2 = TestClient(annotation_app(pairs_file, out2))
    _label_all(client2, "b", _pairs(), pick="output_1")
    assert {r["preference"] for r in read_records(out2)} == {1}


def test_restart_resumes_and_never_repeats(pairs_file, tmp_path):
    out = tmp_path / "labels.jsonl"
    client = TestClient(annotation_app(pairs_file, out, labels_per_pair=2))
    first = []
    for _ in range(3):
        nxt = client.get("/api/next", params={"labeler": "ann"}).json()
        client.post("/api/label", json={"labeler": "ann", "index": nxt["index"], "choice": "tie"})
        first.append(nxt["index"])
    # a new app on the same file: the three labels are there, and "ann" gets only the other pairs
    client = TestClient(annotation_app(pairs_file, out, labels_per_pair=2))
    assert client.get("/api/next", params={"labeler": "ann"}).json()["done"] == 3
    rest = _label_all(client, "ann", _pairs())
    assert sorted(first + rest) == list(range(6))
    r = client.post("/api/label", json={"labeler": "ann", "index": first[0], "choice": "left"})
    assert r.status_code == 409
    assert len(read_records(out)) == 6


def test_labels_per_pair_gives_distinct_labelers(pairs_file, tmp_path):
    out = tmp_path / "labels.jsonl"
    client = TestClient(annotation_app(pairs_file, out, labels_per_pair=2))
    # three labelers take turns, one label each, until nothing is left for anyone
    for turn in range(100):
        offered = [(who, client.get("/api/next", params={"labeler": who}).json()) for who in "abc"]
        offered = [(who, n) for who, n in offered if n["index"] is not None]
        if not offered:
            break
        who, nxt = offered[turn % len(offered)]
        client.post("/api/label", json={"labeler": who, "index": nxt["index"], "choice": "left"})
    rows = read_records(out)
    by_pair = {}
    for r in rows:
        by_pair.setdefault(r["index"], []).append(r["annotator"])
    assert sorted(by_pair) == list(range(6))
    assert all(len(v) == 2 and len(set(v)) == 2 for v in by_pair.values())
    assert len({who for v in by_pair.values() for who in v}) == 3  # the dealing spread the work
    assert client.get("/api/next", params={"labeler": "d"}).json()["index"] is None  # all done
    assert "12 / 12" in client.get("/annotate", params={"labeler": "d"}).text


def test_html_form_flow_and_id_required(pairs_file, tmp_path):
    out = tmp_path / "labels.jsonl"
    client = TestClient(annotation_app(pairs_file, out, annotator_id_required=True))
    assert client.get("/api/next").status_code == 400
    page = client.get("/annotate", params={"labeler": "x y"}).text
    assert "0 / 6" in page and "Left is better" in page
    index = int(page.split("name='index' value='")[1].split("'")[0])
    r = client.post("/label", data={"labeler": "x y", "index": str(index), "choice": "tie"}, follow_redirects=False)
    assert r.status_code == 303
    assert read_records(out)[0]["preference"] == 1.5 and read_records(out)[0]["annotator"] == "x y"
    assert client.post("/label", data={"labeler": "x y", "index": "abc", "choice": "tie"}).status_code == 400


def test_malformed_pairs_file_names_file_row_field(tmp_path):
    bad = tmp_path / "bad.json"
    write_json(bad, [_pairs(1)[0], {"instruction": "x", "output_1": "a"}])
    with pytest.raises(DataError) as e:
        annotation_app(bad, tmp_path / "out.jsonl")
    assert e.value.row == 1 and e.value.field == "output_2" and "bad.json" in str(e.value)


# --- arena -----------------------------------------------------------------------------------

@pytest.fixture
def outputs_files(tmp_path):
    paths = []
    for gen in ("strong-model", "weak-model", "mid-model"):
        path = tmp_path / f"{gen}.json"
        write_json(path, [{"instruction": f"Task {i}", "input": "", "output": f"{gen} says {i}", "generator": gen}
                          for i in range(5)])
        paths.append(path)
    return paths


def test_arena_votes_anonymous_and_leaderboard(outputs_files, tmp_path):
    battles = tmp_path / "battles.jsonl"
    client = TestClient(arena_app(outputs_files, battles))
    names = ("strong-model", "weak-model", "mid-model")
    for _ in range(30):
        page = client.get("/battle", params={"voter": "v"}).text
        assert not any(n in page.replace(f"{n} says", "") for n in names)  # only outputs, no names
        b = client.get("/api/battle", params={"voter": "v"}).json()
        assert "model_a" not in b and "model_b" not in b
        # the voter always prefers the strong model's output (recognised by its text)
        vote = "a" if b["output_a"].startswith("strong-model") else "b" if b["output_b"].startswith("strong-model") else "tie"
        r = client.post("/api/vote", json={"voter": "v", "battle": b["battle"], "vote": vote})
        assert r.status_code == 200
        row = r.json()
        # the recorded model names are those whose outputs were shown
        assert b["output_a"].startswith(row["model_a"]) and b["output_b"].startswith(row["model_b"])
        assert row["winner"] == {"a": "model_a", "b": "model_b", "tie": "tie"}[vote]
    recorded = load_battles(battles)
    assert len(recorded) == 30 and all(b["judge"] == "v" and b["tstamp"] > 0 for b in recorded)
    board = client.get("/api/leaderboard").json()
    assert board[0]["model"] == "strong-model" and board[0]["win_fraction"] == 1.0
    html = client.get("/leaderboard").text
    assert html.index("strong-model") < html.index("mid-model") and html.index("strong-model") < html.index("weak-model")
    # a restarted arena resumes: same count, and the next battle number follows on
    client = TestClient(arena_app(outputs_files, battles))
    assert client.get("/api/battle", params={"voter": "v"}).json()["battle"] == 30
    assert client.post("/api/vote", json={"voter": "v", "battle": 3, "vote": "a"}).status_code == 409


def test_arena_html_vote_reveals_names(outputs_files, tmp_path):
    battles = tmp_path / "battles.jsonl"
    client = TestClient(arena_app(outputs_files, battles))
    assert "No battles yet" in client.get("/leaderboard").text
    r = client.post("/vote", data={"voter": "w", "battle": "0", "vote": "bothbad"})
    row = read_records(battles)[0]
    assert row["winner"] == "tie (bothbad)" and row["model_a"] in r.text and row["model_b"] in r.text


def test_arena_needs_two_generators(tmp_path):
    one = tmp_path / "one.json"
    write_json(one, [{"instruction": "x", "output": "y", "generator": "g"}])
    with pytest.raises(DataError, match="two different generators"):
        arena_app([one], tmp_path / "b.jsonl")


def test_cli_help():
    from prefgym.web.commands import add_commands

    app = typer.Typer()
    add_commands(app)
    runner = CliRunner()
    for command in ("serve-annotate", "arena"):
        result = runner.invoke(app, [command, "--help"])
        assert result.exit_code == 0, result.output
    assert "--labels-per-pair" in runner.invoke(app, ["serve-annotate", "--help"]).output
    assert "--battles" in runner.invoke(app, ["arena", "--help"]).output
