"""The human side: annotation page and arena, driven through their JSON API and HTML pages, with
tokens, CSRF, validation of every field, the database and the old JSONL import."""

from __future__ import annotations

import hashlib
import json

import pytest
import typer
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from prefgym.annotators.analysis import load_cross_annotations
from prefgym.errors import DataError
from prefgym.evaluation import load_battles
from prefgym.io import write_json
from prefgym.web import annotation_app, arena_app

ADMIN = "admin-token-for-tests-0123456789"
BEARER_ADMIN = {"Authorization": f"Bearer {ADMIN}"}
HERE = "http://testserver"


def _pairs(n=6):
    return [{"instruction": f"Say {i}.", "input": "", "output_1": f"first answer {i}",
             "output_2": f"second answer {i}", "generator_1": "m1", "generator_2": "m2"} for i in range(n)]


@pytest.fixture
def pairs_file(tmp_path):
    path = tmp_path / "pairs.json"
    write_json(path, _pairs())
    return path


def _token(client, name, api="/admin/api/tokens"):
    r = client.post(api, json={"name": name}, headers=BEARER_ADMIN)
    assert r.status_code == 200, r.text
    return r.json()["token"]


def _as(token):
    return {"Authorization": f"Bearer {token}"}


def _label_all(client, token, pairs, pick="output_2"):
    """Label every pair offered to the token's labeler, always choosing the side that shows `pick`."""
    seen = []
    while True:
        nxt = client.get("/api/next", headers=_as(token)).json()
        if nxt["index"] is None:
            return seen
        p = pairs[nxt["index"]]
        assert {nxt["left"], nxt["right"]} == {p["output_1"], p["output_2"]}
        choice = "left" if nxt["left"] == p[pick] else "right"
        r = client.post("/api/label", json={"index": nxt["index"], "choice": choice, "ticket": nxt["ticket"]},
                        headers=_as(token))
        assert r.status_code == 200, r.text
        seen.append(nxt["index"])


def _export(client):
    r = client.get("/admin/api/export", headers=BEARER_ADMIN)
    assert r.status_code == 200, r.text
    return r.json()


def test_swap_is_undone_and_labels_are_cross_annotations(pairs_file, tmp_path):
    client = TestClient(annotation_app(tmp_path / "db.sqlite", pairs_file, labels_per_pair=2, admin_token=ADMIN))
    ann = _token(client, "ann")
    sides = set()
    for _ in range(6):
        nxt = client.get("/api/next", headers=_as(ann)).json()
        sides.add(nxt["left"] == _pairs()[nxt["index"]]["output_2"])
        choice = "left" if nxt["left"] == _pairs()[nxt["index"]]["output_2"] else "right"
        client.post("/api/label", json={"index": nxt["index"], "choice": choice, "ticket": nxt["ticket"]},
                    headers=_as(ann))
    assert sides == {True, False}  # both orders were shown, so the undoing was exercised
    rows = _export(client)
    assert len(rows) == 6 and sorted(r["index"] for r in rows) == list(range(6))
    assert all(r["preference"] == 2 and r["annotator"] == "ann" for r in rows)
    for r in rows:
        p = _pairs()[r["index"]]
        assert (r["instruction"], r["output_1"], r["output_2"]) == (p["instruction"], p["output_1"], p["output_2"])
        assert 0 <= r["time_per_example"] < 60 and r["page_version"].startswith("annotate-")
        assert not any("price" in k for k in r)  # human rows, not the simulated judge's
    out = tmp_path / "labels.json"
    write_json(out, rows)
    assert [r["preference"] for r in load_cross_annotations(out)] == [2.0] * 6
    # a tie is 1.5, and a labeler who always picks output_1 gets 1 everywhere
    bee = _token(client, "bee")
    _label_all(client, bee, _pairs(), pick="output_1")
    assert {r["preference"] for r in _export(client) if r["annotator"] == "bee"} == {1}


def test_restart_resumes_and_never_repeats(pairs_file, tmp_path):
    db = tmp_path / "db.sqlite"
    client = TestClient(annotation_app(db, pairs_file, labels_per_pair=2, admin_token=ADMIN))
    ann = _token(client, "ann")
    first = []
    for _ in range(3):
        nxt = client.get("/api/next", headers=_as(ann)).json()
        client.post("/api/label", json={"index": nxt["index"], "choice": "tie"}, headers=_as(ann))
        first.append(nxt["index"])
    # a new app on the same database (and the same pairs file again: nothing is added twice)
    client = TestClient(annotation_app(db, pairs_file, labels_per_pair=2, admin_token=ADMIN))
    nxt = client.get("/api/next", headers=_as(ann)).json()
    assert (nxt["done"], nxt["total"]) == (3, 12)
    rest = _label_all(client, ann, _pairs())
    assert sorted(first + rest) == list(range(6))
    assert client.post("/api/label", json={"index": first[0], "choice": "left"}, headers=_as(ann)).status_code == 409
    assert len(_export(client)) == 6


def test_labels_per_pair_gives_distinct_labelers(pairs_file, tmp_path):
    client = TestClient(annotation_app(tmp_path / "db.sqlite", pairs_file, labels_per_pair=2, admin_token=ADMIN))
    tokens = {who: _token(client, who) for who in "abcd"}
    for turn in range(100):  # three labelers take turns, one label each, until nothing is left
        offered = [(who, client.get("/api/next", headers=_as(tokens[who])).json()) for who in "abc"]
        offered = [(who, n) for who, n in offered if n["index"] is not None]
        if not offered:
            break
        who, nxt = offered[turn % len(offered)]
        client.post("/api/label", json={"index": nxt["index"], "choice": "left"}, headers=_as(tokens[who]))
    by_pair = {}
    for r in _export(client):
        by_pair.setdefault(r["index"], []).append(r["annotator"])
    assert sorted(by_pair) == list(range(6))
    assert all(len(v) == 2 and len(set(v)) == 2 for v in by_pair.values())
    assert len({who for v in by_pair.values() for who in v}) == 3  # the dealing spread the work
    assert client.get("/api/next", headers=_as(tokens["d"])).json()["index"] is None  # all done
    progress = {p["name"]: p["done"] for p in client.get("/admin/api/progress", headers=BEARER_ADMIN).json()}
    assert progress == {"a": 4, "b": 4, "c": 4, "d": 0}


# --- who may do what -------------------------------------------------------------------------

def test_tokens_guard_everything_and_identity_comes_from_the_token(pairs_file, tmp_path):
    client = TestClient(annotation_app(tmp_path / "db.sqlite", pairs_file, admin_token=ADMIN))
    ann = _token(client, "ann")
    assert client.get("/api/next").status_code == 401
    assert client.post("/api/label", json={"index": 0, "choice": "left"}).status_code == 401
    assert client.get("/annotate").status_code == 401
    assert client.get("/api/next", headers=_as("made-up-token")).status_code == 401
    assert client.get("/annotate", params={"token": "made-up-token"}).status_code == 401
    # a labeller's token opens none of the admin doors, and the admin's is not a labeller's
    for method, path in (("get", "/admin/api/export"), ("get", "/admin/api/progress"), ("get", "/admin"),
                         ("post", "/admin/api/tokens"), ("post", "/admin/api/pairs")):
        kwargs = {"json": {"name": "x"} if path.endswith("tokens") else []} if method == "post" else {}
        assert getattr(client, method)(path, headers=_as(ann), **kwargs).status_code == 401, path
    assert client.get("/api/next", headers=BEARER_ADMIN).status_code == 401
    # a label is stored under the token's name: the body cannot name someone else
    r = client.post("/api/label", json={"labeler": "mallory", "index": 0, "choice": "left"}, headers=_as(ann))
    assert r.status_code == 422 and "labeler" in r.json()["detail"]
    assert client.post("/api/label", json={"index": 0, "choice": "left"}, headers=_as(ann)).json()["annotator"] == "ann"
    # a second live token for the same name is refused; after revoking, the old token is dead
    assert client.post("/admin/api/tokens", json={"name": "ann"}, headers=BEARER_ADMIN).status_code == 409
    assert client.post("/admin/api/revoke", json={"name": "ann"}, headers=BEARER_ADMIN).json() == {"revoked": True}
    assert client.get("/api/next", headers=_as(ann)).status_code == 401
    ann2 = _token(client, "ann")
    assert client.get("/api/next", headers=_as(ann2)).json()["done_by_you"] == 1  # same person, new token


def test_tokens_are_stored_hashed(pairs_file, tmp_path):
    db = tmp_path / "db.sqlite"
    client = TestClient(annotation_app(db, pairs_file, admin_token=ADMIN))
    ann = _token(client, "ann")
    client.get("/api/next", headers=_as(ann))
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("db.sqlite*"))
    assert ann.encode() not in raw and ADMIN.encode() not in raw
    assert hashlib.sha256(ann.encode()).hexdigest().encode() in raw


def test_admin_token_from_env_or_generated(pairs_file, tmp_path, monkeypatch):
    monkeypatch.setenv("PREFGYM_ADMIN_TOKEN", "env-admin-token-0123456789")
    app = annotation_app(tmp_path / "db.sqlite", pairs_file)
    client = TestClient(app)
    assert client.get("/admin/api/progress", headers=_as("env-admin-token-0123456789")).status_code == 200
    monkeypatch.delenv("PREFGYM_ADMIN_TOKEN")
    one, two = (annotation_app(tmp_path / "db.sqlite", pairs_file).state.admin_token for _ in range(2))
    assert one != two and len(one) >= 40  # fresh and long each start
    monkeypatch.setenv("PREFGYM_ADMIN_TOKEN", "short")
    with pytest.raises(ValueError, match="PREFGYM_ADMIN_TOKEN"):
        annotation_app(tmp_path / "db.sqlite", pairs_file)


def _login(client, token, page="/annotate"):
    r = client.get(page, params={"token": token}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == page  # the token leaves the address bar
    assert "HttpOnly" in r.headers["set-cookie"] and "samesite=strict" in r.headers["set-cookie"].lower()
    html = client.get(page).text
    return html, html.split("name='csrf' value='")[1].split("'")[0]


def _form_fields(html):
    return {k: html.split(f"name='{k}' value='")[1].split("'")[0] for k in ("csrf", "index", "ticket")}


def test_form_posts_need_same_origin_and_the_csrf_token(pairs_file, tmp_path):
    client = TestClient(annotation_app(tmp_path / "db.sqlite", pairs_file, admin_token=ADMIN))
    html, _ = _login(client, _token(client, "ann"))
    fields = _form_fields(html)
    post = dict(fields, choice="tie")

    def n_labels():
        return len(_export(client))

    refused = [
        ({"Origin": "http://evil.example"}, post),                      # another site
        ({"Origin": "null"}, post),                                     # a sandboxed frame
        ({}, post),                                                     # neither Origin nor Referer
        ({"Referer": "http://evil.example/testserver"}, post),
        ({"Origin": HERE}, dict(post, csrf="0" * 32)),                  # same site, wrong token
        ({"Origin": HERE}, {k: v for k, v in post.items() if k != "csrf"}),  # no token
    ]
    for headers, data in refused:
        r = client.post("/label", data=data, headers=headers, follow_redirects=False)
        assert r.status_code == 403, (headers, r.status_code)
    assert n_labels() == 0
    r = client.post("/label", data=post, headers={"Referer": f"{HERE}/annotate"}, follow_redirects=False)
    assert r.status_code == 303 and n_labels() == 1
    assert _export(client)[0]["preference"] == 1.5 and _export(client)[0]["time_per_example"] >= 0
    # the JSON API on the session cookie needs the token in a header
    nxt = client.get("/api/next").json()
    body = {"index": nxt["index"], "choice": "left"}
    assert client.post("/api/label", json=body, headers={"Origin": HERE}).status_code == 403
    r = client.post("/api/label", json=body, headers={"Origin": HERE, "X-CSRF-Token": fields["csrf"]})
    assert r.status_code == 200 and n_labels() == 2


def test_admin_pages_make_links_with_csrf(pairs_file, tmp_path):
    client = TestClient(annotation_app(tmp_path / "db.sqlite", pairs_file, admin_token=ADMIN))
    html, csrf = _login(client, ADMIN, page="/admin")
    assert client.post("/admin/tokens", data={"name": "zoe", "csrf": csrf},
                       headers={"Origin": "http://evil.example"}).status_code == 403
    r = client.post("/admin/tokens", data={"name": "zoe", "csrf": csrf}, headers={"Origin": HERE})
    link = r.text.split("id='new-link'>")[1].split("<")[0]
    assert link.startswith(f"{HERE}/annotate?token=")
    labeler = TestClient(client.app)
    assert "Left is better" in _login(labeler, link.split("token=")[1])[0]
    r = client.post("/admin/api/pairs", json=_pairs(8), headers={"Origin": HERE, "X-CSRF-Token": csrf})
    assert r.json() == {"added": 2, "total": 8}  # the six already there are not added twice
    r = client.post("/admin/api/pairs", json=[{"instruction": "x", "output_1": "a"}], headers=BEARER_ADMIN)
    assert r.status_code == 400 and "row 0" in r.json()["detail"] and "output_2" in r.json()["detail"]


# --- malformed requests: 4xx, never 5xx, nothing stored --------------------------------------

MALFORMED_LABELS = [
    '{"labeler": ["a"], "index": 0, "choice": "left"}',
    '{"index": 1e400, "choice": "left"}',
    '{"index": -1e400, "choice": "left"}',
    '{"index": 100000000000000000000000000000000, "choice": "left"}',
    '{"index": -1, "choice": "left"}',
    '{"index": "0", "choice": "left"}',
    '{"index": 0.0, "choice": "left"}',
    '{"index": true, "choice": "left"}',
    '{"index": null, "choice": "left"}',
    '{"index": {"$gt": 0}, "choice": "left"}',
    '{"index": [0], "choice": "left"}',
    '{"index": 0, "choice": ["left"]}',
    '{"index": 0, "choice": "LEFT"}',
    '{"index": 0}',
    '{"choice": "left"}',
    '{}',
    '[]',
    '"left"',
    'null',
    '{"index": 0, "choice": "left"',
    '{"index": 0, "choice": "left", "ticket": "' + "9" * 5000 + '"}',
    '{"index": 0, "choice": "left", "ticket": "0.1.forged"}',
    '{"index": 0, "choice": "left", "idempotency_key": "' + "k" * 500 + '"}',
    '{"index": 0, "choice": "left", "idempotency_key": "has spaces and \\u00e9"}',
    '{"index": 999, "choice": "left"}',
    '{"index": 0, "choice": "left", "extra": {"deep": [[[[1]]]]}}',
    '{"index": 0, "choice": "left", "pad": "' + "x" * 70000 + '"}',
]


def test_malformed_label_requests_are_4xx(pairs_file, tmp_path):
    client = TestClient(annotation_app(tmp_path / "db.sqlite", pairs_file, admin_token=ADMIN),
                        raise_server_exceptions=False)
    headers = {**_as(_token(client, "ann")), "Content-Type": "application/json"}
    for body in MALFORMED_LABELS:
        r = client.post("/api/label", content=body, headers=headers)
        assert 400 <= r.status_code < 500, (body[:80], r.status_code, r.text[:200])
        assert len(r.text) < 1000  # a short message, not the input echoed back
    assert _export(client) == []
    # the form parser too
    html, csrf = _login(client, _token(client, "bo"))
    for data in ("index=1e400&choice=left", "index=0&index=1&choice=left", "index=0&choice=left&labeler=x",
                 "%ff%fe=1", "index=0&choice=left&ticket=" + "9" * 500, "a" * 60000, "&&&=="):
        r = client.post("/label", content=f"csrf={csrf}&" + data, headers={
            "Origin": HERE, "Content-Type": "application/x-www-form-urlencoded"}, follow_redirects=False)
        assert 400 <= r.status_code < 500, (data[:60], r.status_code)
    assert client.post("/label", headers={"Origin": HERE, "Transfer-Encoding": "chunked"},
                       content=iter([b"index=0"])).status_code == 411
    assert _export(client) == []


def test_unknown_ids_leave_no_state(pairs_file, tmp_path, outputs_files):
    """Requests from unknown or made-up people store nothing and grow nothing."""
    app = arena_app(tmp_path / "db.sqlite", outputs_files, admin_token=ADMIN)
    client = TestClient(app)
    before = dict(vars(app.state.arena))
    for i in range(300):
        assert client.get("/api/battle", headers=_as(f"unknown-{i}")).status_code == 401
        assert client.post("/api/vote", json={"battle": 0, "vote": "a"}, headers=_as(f"u-{i}")).status_code == 401
    store = app.state.store
    assert [store.query(f"SELECT count(*) AS n FROM {t}")[0]["n"] for t in ("tokens", "dealt", "battles")] == [0, 0, 0]
    assert vars(app.state.arena).keys() == before.keys()
    assert all(len(v) == len(before[k]) for k, v in vars(app.state.arena).items() if hasattr(v, "__len__"))
    # a known voter asking for a battle many times gets the same one, dealt once
    v = _token(client, "v")
    battles = {json.dumps(client.get("/api/battle", headers=_as(v)).json()) for _ in range(20)}
    assert len(battles) == 1 and store.query("SELECT count(*) AS n FROM dealt")[0]["n"] == 1


# --- the old JSONL files ---------------------------------------------------------------------

def test_import_old_labels_tolerates_a_torn_last_line(pairs_file, tmp_path, capsys):
    old = tmp_path / "labels.jsonl"
    rows = [{**_pairs()[i], "preference": p, "annotator": who, "time_per_example": 2.5, "index": i}
            for i, p, who in ((0, 2, "a"), (1, 1, "a"), (0, 1.5, "b"))]
    old.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"instruction": "Say 2.", "prefe',
                   encoding="utf-8")
    app = annotation_app(tmp_path / "db.sqlite", pairs_file, admin_token=ADMIN, import_jsonl=old)
    assert "line 4 is torn" in capsys.readouterr().err
    got = [(r["index"], r["preference"], r["annotator"], r["page_version"]) for r in _export(TestClient(app))]
    assert got == [(0, 2.0, "a", "jsonl-import"), (1, 1.0, "a", "jsonl-import"), (0, 1.5, "b", "jsonl-import")]
    # importing again adds nothing; a bad line that is not the last is an error naming file and row
    app = annotation_app(tmp_path / "db.sqlite", pairs_file, admin_token=ADMIN, import_jsonl=old)
    assert len(_export(TestClient(app))) == 3
    old.write_text(json.dumps(rows[0]) + "\n{oops\n" + json.dumps(rows[1]) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"labels.jsonl, row 1: invalid JSON on line 2"):
        annotation_app(tmp_path / "db2.sqlite", pairs_file, admin_token=ADMIN, import_jsonl=old)


def test_import_old_battles_tolerates_a_torn_last_line(outputs_files, tmp_path, capsys):
    old = tmp_path / "battles.jsonl"
    rows = [{"model_a": "strong-model", "model_b": "weak-model", "winner": "model_a", "judge": "v", "tstamp": 1.0}] * 3
    old.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"model_a": "str', encoding="utf-8")
    app = arena_app(tmp_path / "db.sqlite", outputs_files, admin_token=ADMIN, import_jsonl=old)
    assert "torn" in capsys.readouterr().err
    assert len(_export(TestClient(app))) == 3
    assert TestClient(app).get("/api/battle", headers=_as(_token(TestClient(app), "v"))).json()["battle"] == 3


def test_malformed_pairs_file_names_file_row_field(tmp_path):
    bad = tmp_path / "bad.json"
    write_json(bad, [_pairs(1)[0], {"instruction": "x", "output_1": "a"}])
    with pytest.raises(DataError) as e:
        annotation_app(tmp_path / "db.sqlite", bad, admin_token=ADMIN)
    assert e.value.row == 1 and e.value.field == "output_2" and "bad.json" in str(e.value)


def test_guidelines_are_shown_and_versioned(pairs_file, tmp_path):
    apps = [annotation_app(tmp_path / f"db{i}.sqlite", pairs_file, admin_token=ADMIN, guidelines=g)
            for i, g in enumerate(("Prefer <b>short</b> answers.", "Prefer long answers."))]
    versions = []
    for app in apps:
        client = TestClient(app)
        html, _ = _login(client, _token(client, "ann"))
        fields = _form_fields(html)
        client.post("/label", data=dict(fields, choice="left"), headers={"Origin": HERE})
        versions.append(_export(client)[0]["page_version"])
    assert "Prefer long answers." in html and "<details class='guidelines' open>" in html
    assert versions[0] != versions[1]  # the rows say which guidelines the labeller saw
    client = TestClient(apps[0])
    html, _ = _login(client, _token(client, "bo"))
    assert "Prefer &lt;b&gt;short&lt;/b&gt; answers." in html  # escaped, never raw HTML


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


def _vote_strong(client, token):
    b = client.get("/api/battle", headers=_as(token)).json()
    vote = "a" if b["output_a"].startswith("strong-model") else "b" if b["output_b"].startswith("strong-model") else "tie"
    r = client.post("/api/vote", json={"battle": b["battle"], "vote": vote}, headers=_as(token))
    assert r.status_code == 200, r.text
    return b, vote, r.json()


def test_arena_votes_anonymous_and_leaderboard(outputs_files, tmp_path):
    db = tmp_path / "db.sqlite"
    client = TestClient(arena_app(db, outputs_files, admin_token=ADMIN))
    v = _token(client, "v")
    names = ("strong-model", "weak-model", "mid-model")
    _login(client, v, page="/battle")
    for _ in range(30):
        page = client.get("/battle").text
        assert not any(n in page.replace(f"{n} says", "") for n in names)  # only outputs, no names
        b, vote, row = _vote_strong(client, v)
        assert "model_a" not in b and "model_b" not in b
        assert b["output_a"].startswith(row["model_a"]) and b["output_b"].startswith(row["model_b"])
        assert row["winner"] == {"a": "model_a", "b": "model_b", "tie": "tie"}[vote] and row["judge"] == "v"
    board = client.get("/api/leaderboard", headers=_as(v)).json()
    assert board[0]["model"] == "strong-model" and board[0]["win_fraction"] == 1.0
    html = client.get("/leaderboard").text
    assert "30 battles" in html and html.index("strong-model") < html.index("mid-model") < 10**9
    assert html.index("strong-model") < html.index("weak-model")
    assert TestClient(client.app).get("/api/leaderboard").status_code == 401
    # a restarted arena resumes: same count, and the next battle number follows on
    client = TestClient(arena_app(db, outputs_files, admin_token=ADMIN))
    assert client.get("/api/battle", headers=_as(v)).json()["battle"] == 30
    assert client.post("/api/vote", json={"battle": 3, "vote": "a"}, headers=_as(v)).status_code == 409
    assert client.post("/api/vote", json={"battle": 31, "vote": "a"}, headers=_as(v)).status_code == 409
    out = tmp_path / "battles.json"
    write_json(out, _export(client))
    assert len(load_battles(out)) == 30


def test_arena_vote_retry_with_idempotency_key_counts_once(outputs_files, tmp_path):
    client = TestClient(arena_app(tmp_path / "db.sqlite", outputs_files, admin_token=ADMIN))
    v, w = _token(client, "v"), _token(client, "w")
    b = client.get("/api/battle", headers=_as(v)).json()
    body = {"battle": b["battle"], "vote": "a", "idempotency_key": "v-0001"}
    first = client.post("/api/vote", json=body, headers=_as(v))
    again = client.post("/api/vote", json=body, headers=_as(v))  # the reply was lost; the client retries
    assert first.status_code == again.status_code == 200 and first.json() == again.json()
    assert len(_export(client)) == 1
    assert client.post("/api/vote", json={"battle": 0, "vote": "a"}, headers=_as(v)).status_code == 409  # no key
    client.get("/api/battle", headers=_as(w))
    assert client.post("/api/vote", json=body, headers=_as(w)).status_code == 409  # someone else's key
    assert client.post("/api/vote", json={"battle": 0, "vote": "a"}, headers=_as(w)).status_code == 200
    # a vote on a battle never shown is refused
    assert client.post("/api/vote", json={"battle": 1, "vote": "a"}, headers=_as(w)).status_code == 409


def test_leaderboard_is_cached_until_the_votes_change(outputs_files, tmp_path, monkeypatch):
    import prefgym.web.app as web_app

    calls = []
    real = web_app.ratings_table
    monkeypatch.setattr(web_app, "ratings_table", lambda battles, **kw: calls.append(len(battles)) or real(battles, **kw))
    app = arena_app(tmp_path / "db.sqlite", outputs_files, admin_token=ADMIN)
    client = TestClient(app)
    v = _token(client, "v")
    for _ in range(3):
        _vote_strong(client, v)
    for _ in range(5):
        client.get("/api/leaderboard", headers=_as(v))
        client.get("/leaderboard", headers=_as(v))
    assert calls == [3]
    _vote_strong(client, v)
    first = client.get("/api/leaderboard", headers=_as(v)).json()
    assert client.get("/api/leaderboard", headers=_as(v)).json() == first and calls == [3, 4]
    # the cached table is the one a fresh computation gives
    assert first == [{"model": m, **{k: float(x) for k, x in row.items()}}
                     for m, row in real(app.state.store.battles(), n_bootstrap=50, seed=0).iterrows()]


def test_malformed_votes_are_4xx(outputs_files, tmp_path):
    client = TestClient(arena_app(tmp_path / "db.sqlite", outputs_files, admin_token=ADMIN),
                        raise_server_exceptions=False)
    headers = {**_as(_token(client, "v")), "Content-Type": "application/json"}
    client.get("/api/battle", headers=headers)
    for body in ('{"voter": ["a"], "battle": 0, "vote": "a"}', '{"battle": 1e400, "vote": "a"}',
                 '{"battle": 0, "vote": {"a": 1}}', '{"battle": 0}', '{"battle": 0, "vote": "a", '
                 '"idempotency_key": ""}', '{"battle": "0", "vote": "a"}', '[1, 2]', '{"battle": 99999999999999, '
                 '"vote": "a"}'):
        r = client.post("/api/vote", content=body, headers=headers)
        assert 400 <= r.status_code < 500, (body, r.status_code)
    for name in ("", " ", "x" * 65, "<script>", "a\nb", ["a"], 7):
        assert client.post("/admin/api/tokens", json={"name": name}, headers=BEARER_ADMIN).status_code == 422
    assert _export(client) == []


def test_arena_html_vote_reveals_names(outputs_files, tmp_path):
    client = TestClient(arena_app(tmp_path / "db.sqlite", outputs_files, admin_token=ADMIN))
    _, csrf = _login(client, _token(client, "w"), page="/battle")
    assert "No battles yet" in client.get("/leaderboard").text
    r = client.post("/vote", data={"battle": "0", "vote": "bothbad", "csrf": csrf}, headers={"Origin": HERE})
    row = _export(client)[0]
    assert row["winner"] == "tie (bothbad)" and row["model_a"] in r.text and row["model_b"] in r.text
    assert client.post("/vote", data={"battle": "1", "vote": "a", "csrf": csrf},
                       headers={"Origin": "http://evil.example"}).status_code == 403


def test_arena_needs_two_generators(tmp_path):
    one = tmp_path / "one.json"
    write_json(one, [{"instruction": "x", "output": "y", "generator": "g"}])
    with pytest.raises(DataError, match="two different generators"):
        arena_app(tmp_path / "db.sqlite", [one], admin_token=ADMIN)


# --- commands --------------------------------------------------------------------------------

def _cli():
    from prefgym.web.commands import add_commands

    app = typer.Typer()
    add_commands(app)
    return app


def test_cli_help():
    runner = CliRunner()
    for command in ("serve-annotate", "arena", "human-token", "human-export"):
        result = runner.invoke(_cli(), [command, "--help"])
        assert result.exit_code == 0, result.output
    assert "--guidelines" in runner.invoke(_cli(), ["serve-annotate", "--help"]).output


def test_cli_tokens_and_export_feed_the_analysis_commands(pairs_file, outputs_files, tmp_path):
    db = tmp_path / "db.sqlite"
    runner = CliRunner()
    tokens = {}
    for name in ("a", "b"):
        result = runner.invoke(_cli(), ["human-token", str(db), "--name", name])
        assert result.exit_code == 0, result.output
        tokens[name] = result.output.strip()
    voter = runner.invoke(_cli(), ["human-token", str(db), "--name", "v", "--role", "voter"]).output.strip()
    assert runner.invoke(_cli(), ["human-token", str(db), "--name", "a"]).exit_code != 0  # live token
    client = TestClient(annotation_app(db, pairs_file, labels_per_pair=2, admin_token=ADMIN))
    for name in ("a", "b"):
        _label_all(client, tokens[name], _pairs(), pick="output_1" if name == "a" else "output_2")
    arena = TestClient(arena_app(db, outputs_files, admin_token=ADMIN))
    for _ in range(4):
        _vote_strong(arena, voter)
    labels, battles = tmp_path / "human.json", tmp_path / "battles.json"
    result = runner.invoke(_cli(), ["human-export", str(db), "--labels", str(labels), "--battles", str(battles)])
    assert result.exit_code == 0, result.output
    cross = load_cross_annotations(labels)
    assert len(cross) == 12 and {r["annotator"] for r in cross} == {"a", "b"}
    assert len(load_battles(battles)) == 4
    from prefgym.annotators.analysis import _group

    grouped_pairs, labels_per_pair = _group(cross)  # what analyze-annotators computes agreement on
    assert len(grouped_pairs) == 6 and all(sorted(ls) == [1.0, 2.0] for ls in labels_per_pair)


def test_access_log_never_shows_tokens_and_admin_link_never_goes_to_stdout(pairs_file, tmp_path, monkeypatch,
                                                                            capsys):
    import logging

    from prefgym.errors import PrefgymError
    from prefgym.web.commands import _show_admin_link
    from prefgym.web.security import RedactTokens

    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
                               ("127.0.0.1:5", "GET", "/annotate?token=s3cr3t-t0ken&x=1", "1.1", 303), None)
    assert RedactTokens().filter(record)
    assert "s3cr3t" not in record.getMessage() and "token=<redacted>&x=1" in record.getMessage()
    app = annotation_app(tmp_path / "db.sqlite", pairs_file, admin_token=ADMIN)
    monkeypatch.delenv("PREFGYM_ADMIN_TOKEN", raising=False)
    written = []

    class Tty:
        def __init__(self, *a, **k):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

        def write(self, text):
            written.append(text)

    monkeypatch.setattr("builtins.open", lambda path, *a, **k: Tty() if path == "/dev/tty" else
                        (_ for _ in ()).throw(OSError("no")))
    _show_admin_link(app, "127.0.0.1", 8000)
    assert ADMIN in written[0] and ADMIN not in capsys.readouterr().out  # the terminal only

    def no_tty(path, *a, **k):
        raise OSError("no terminal")

    monkeypatch.setattr("builtins.open", no_tty)
    with pytest.raises(PrefgymError, match="PREFGYM_ADMIN_TOKEN"):
        _show_admin_link(app, "127.0.0.1", 8000)
    assert ADMIN not in capsys.readouterr().out
