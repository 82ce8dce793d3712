"""The human side: a pairwise annotation page and an arena of anonymous battles with a leaderboard.

Two small FastAPI apps with server-rendered HTML and a JSON API alongside (for scripts and tests).
Everything a person does is appended at once to a JSON Lines file (flushed and fsynced), and the
state of an app is rebuilt from that file, so a restart loses nothing and resumes where each
person left off.

- `annotation_app(pairs, out)`: pairs (instruction, input, output_1, output_2) are shown one at a
  time, in a seeded left/right order per (labeler, pair); each label is written with the swap
  undone, in AlpacaFarm's convention (preference 1, 2, or 1.5 for a tie), annotator = labeler id.
- `arena_app(outputs_files, battles)`: an instruction and two anonymous outputs from two
  generators; the model names are shown only after the vote; each vote is a Chatbot Arena
  battle (model_a, model_b, winner, judge, tstamp) for `prefgym elo`.
"""

from __future__ import annotations

import html
import json
import os
import threading
import time
from pathlib import Path
from urllib.parse import parse_qs, quote

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse

from prefgym.data import load_records
from prefgym.errors import DataError
from prefgym.evaluation import load_battles, ratings_table
from prefgym.io import read_records
from prefgym.seeding import rng_for, stable_hash

ANNOTATE_CHOICES = ("left", "right", "tie")
ARENA_VOTES = {"a": "model_a", "b": "model_b", "tie": "tie", "bothbad": "tie (bothbad)"}


def append_durably(path: Path, row: dict) -> None:
    """One JSON line, flushed and fsynced before returning: a crash after this loses nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _page(title: str, body: str) -> HTMLResponse:
    style = ("body{font-family:sans-serif;max-width:70em;margin:2em auto;padding:0 1em}"
             ".cols{display:flex;gap:1em}.cols>div{flex:1;border:1px solid #ccc;padding:.5em}"
             "pre{white-space:pre-wrap;font-family:inherit}button{font-size:1.1em;margin:.3em}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2em .6em}")
    return HTMLResponse(f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                        f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>")


def _prompt_html(instruction: str, input: str) -> str:
    text = f"<h3>Instruction</h3><pre>{html.escape(instruction)}</pre>"
    return text + (f"<h3>Input</h3><pre>{html.escape(input)}</pre>" if input else "")


async def _form(request: Request) -> dict[str, str]:
    """A url-encoded form body (parsed by hand: no multipart dependency for three fields)."""
    body = (await request.body()).decode("utf-8")
    return {k: v[0] for k, v in parse_qs(body, keep_blank_values=True).items()}


def _as_int(value) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise HTTPException(400, f"expected an integer, got {value!r}") from None


def _start_page(title: str, action: str, who: str) -> HTMLResponse:
    return _page(title, f"<form action='{action}' method='get'><label>Your name or ID: "
                        f"<input name='{who}' autofocus required></label> <button>Start</button></form>")


# --- annotation page -------------------------------------------------------------------------

class Annotation:
    """Pairs to label and the labels so far (rebuilt from the out file)."""

    def __init__(self, pairs_path, out_path, labels_per_pair: int = 1):
        if labels_per_pair < 1:
            raise DataError("--labels-per-pair must be at least 1")
        self.pairs = load_records(pairs_path, required=("instruction", "output_1", "output_2"))
        if not self.pairs:
            raise DataError("no pairs to annotate", path=pairs_path)
        self.out_path, self.labels_per_pair = Path(out_path), labels_per_pair
        self.labelers: list[set[str]] = [set() for _ in self.pairs]  # who labelled each pair
        self.shown: dict[tuple[str, int], float] = {}  # (labeler, index) -> time it was served
        self.lock = threading.Lock()
        if self.out_path.exists():
            for i, row in enumerate(read_records(self.out_path)):
                if not isinstance(row.get("index"), int) or not 0 <= row["index"] < len(self.pairs):
                    raise DataError(f"index is not a pair of {pairs_path}; is this the labels file of "
                                    "another pairs file?", path=self.out_path, row=i, field="index")
                self.labelers[row["index"]].add(str(row.get("annotator")))

    def swapped(self, labeler: str, index: int) -> bool:
        """Whether output_2 is shown on the left for this labeler (seeded, stable across restarts)."""
        return stable_hash("annotate-swap", labeler, index) % 2 == 1

    def progress(self, labeler: str) -> dict:
        return {"done": sum(len(s) for s in self.labelers), "total": len(self.pairs) * self.labels_per_pair,
                "done_by_you": sum(labeler in s for s in self.labelers)}

    def next_pair(self, labeler: str) -> dict:
        """The open pair with the fewest labels that this labeler has not labelled, shown left/right."""
        with self.lock:
            open_ = [i for i, s in enumerate(self.labelers) if labeler not in s and len(s) < self.labels_per_pair]
            if not open_:
                return {"index": None, **self.progress(labeler)}
            i = min(open_, key=lambda j: len(self.labelers[j]))
            self.shown.setdefault((labeler, i), time.time())
        p = self.pairs[i]
        left, right = (p["output_2"], p["output_1"]) if self.swapped(labeler, i) else (p["output_1"], p["output_2"])
        return {"index": i, "instruction": p["instruction"], "input": p["input"], "left": left, "right": right,
                **self.progress(labeler)}

    def label(self, labeler: str, index: int, choice: str) -> dict:
        """Record a choice (left / right / tie) with the swap undone; returns the stored row."""
        if not labeler:
            raise HTTPException(400, "a labeler id is required")
        if choice not in ANNOTATE_CHOICES:
            raise HTTPException(400, f"choice must be one of {', '.join(ANNOTATE_CHOICES)}")
        if not 0 <= index < len(self.pairs):
            raise HTTPException(404, f"no pair {index}")
        with self.lock:
            if labeler in self.labelers[index]:
                raise HTTPException(409, f"{labeler} already labelled pair {index}")
            preference = 1.5
            if choice != "tie":
                preference = 2 if (choice == "left") == self.swapped(labeler, index) else 1
            p = self.pairs[index]
            shown = self.shown.pop((labeler, index), None)
            row = {**p, "preference": preference, "annotator": labeler,
                   "time_per_example": round(time.time() - shown, 3) if shown else None, "index": index}
            append_durably(self.out_path, row)
            self.labelers[index].add(labeler)
        return row


def annotation_app(pairs_path, out_path, labels_per_pair: int = 1, annotator_id_required: bool = False) -> FastAPI:
    """The annotation web app: `/` (start), `/annotate?labeler=ID`, and `/api/next`, `/api/label`."""
    state = Annotation(pairs_path, out_path, labels_per_pair)
    app = FastAPI(title="prefgym annotation")
    app.state.annotation = state

    def labeler_id(labeler: str | None) -> str:
        labeler = (labeler or "").strip()
        if not labeler and annotator_id_required:
            raise HTTPException(400, "a labeler id is required (?labeler=ID)")
        return labeler or "anonymous"

    @app.get("/", response_class=HTMLResponse)
    def start():
        return _start_page("Which response is better?", "/annotate", "labeler")

    @app.get("/annotate", response_class=HTMLResponse)
    def annotate_page(labeler: str | None = None):
        who = labeler_id(labeler)
        nxt = state.next_pair(who)
        progress = f"<p>{nxt['done']} / {nxt['total']} labels done ({nxt['done_by_you']} by you, {html.escape(who)})</p>"
        if nxt["index"] is None:
            return _page("Thank you", progress + "<p>Nothing left for you to label.</p>")
        buttons = "".join(f"<button name='choice' value='{c}' accesskey='{c[0]}'>{label}</button>"
                          for c, label in (("left", "Left is better"), ("right", "Right is better"), ("tie", "Tie")))
        body = (progress + _prompt_html(nxt["instruction"], nxt["input"])
                + f"<div class='cols'><div><h3>Left</h3><pre>{html.escape(nxt['left'])}</pre></div>"
                f"<div><h3>Right</h3><pre>{html.escape(nxt['right'])}</pre></div></div>"
                f"<form method='post' action='/label'><input type='hidden' name='labeler' value='{html.escape(who)}'>"
                f"<input type='hidden' name='index' value='{nxt['index']}'>{buttons}</form>"
                "<p><small>Keys: Alt+l left, Alt+r right, Alt+t tie.</small></p>")
        return _page("Which response is better?", body)

    @app.post("/label")
    async def label_form(request: Request):
        form = await _form(request)
        who = labeler_id(form.get("labeler"))
        state.label(who, _as_int(form.get("index")), form.get("choice", ""))
        return RedirectResponse(f"/annotate?labeler={quote(who)}", status_code=303)

    @app.get("/api/next")
    def api_next(labeler: str | None = None):
        return state.next_pair(labeler_id(labeler))

    @app.post("/api/label")
    def api_label(payload: dict):
        return state.label(labeler_id(payload.get("labeler")), _as_int(payload.get("index")),
                           payload.get("choice", ""))

    return app


# --- arena -----------------------------------------------------------------------------------

class Arena:
    """Model outputs grouped by instruction, and the battles voted so far (rebuilt from the file)."""

    def __init__(self, outputs_paths, battles_path, seed: int = 0):
        by_prompt: dict[tuple[str, str], dict[str, str]] = {}
        for path in outputs_paths:
            for r in load_records(path, required=("instruction", "output", "generator")):
                by_prompt.setdefault((r["instruction"], r["input"]), {})[r["generator"]] = r["output"]
        # only instructions answered by at least two generators can make a battle
        self.prompts = [(k, gens) for k, gens in by_prompt.items() if len(gens) >= 2]
        if not self.prompts:
            raise DataError("no instruction has outputs from two different generators; give the model_outputs "
                            "files of at least two generators on the same instructions",
                            path=", ".join(str(p) for p in outputs_paths))
        self.battles_path, self.seed = Path(battles_path), seed
        voted = self.battles_path.exists() and self.battles_path.read_text(encoding="utf-8").strip()
        self.battles = load_battles(self.battles_path) if voted else []
        self.votes_by: dict[str, int] = {}
        for b in self.battles:
            self.votes_by[str(b.get("judge"))] = self.votes_by.get(str(b.get("judge")), 0) + 1
        self.lock = threading.Lock()

    def battle(self, voter: str, number: int) -> dict:
        """The voter's battle number `number`: seeded, so the server need not remember it."""
        rng = rng_for("arena", self.seed, voter, number)
        (instruction, input), gens = self.prompts[int(rng.integers(len(self.prompts)))]
        model_a, model_b = rng.choice(sorted(gens), size=2, replace=False).tolist()
        return {"battle": number, "instruction": instruction, "input": input, "model_a": model_a,
                "model_b": model_b, "output_a": gens[model_a], "output_b": gens[model_b]}

    def next_battle(self, voter: str) -> dict:
        """The voter's next battle, without the model names."""
        b = self.battle(voter, self.votes_by.get(voter, 0))
        return {k: v for k, v in b.items() if k not in ("model_a", "model_b")}

    def vote(self, voter: str, number: int, vote: str) -> dict:
        if not voter:
            raise HTTPException(400, "a voter id is required")
        if vote not in ARENA_VOTES:
            raise HTTPException(400, f"vote must be one of {', '.join(ARENA_VOTES)}")
        with self.lock:
            if number != self.votes_by.get(voter, 0):
                raise HTTPException(409, f"battle {number} is not {voter}'s current battle (already voted?)")
            b = self.battle(voter, number)
            row = {"model_a": b["model_a"], "model_b": b["model_b"], "winner": ARENA_VOTES[vote],
                   "instruction": b["instruction"], "input": b["input"], "judge": voter, "tstamp": time.time()}
            append_durably(self.battles_path, row)
            self.battles.append(row)
            self.votes_by[voter] = number + 1
        return row

    def leaderboard(self, n_bootstrap: int = 50) -> list[dict]:
        """Bradley–Terry and online Elo ratings (95% bootstrap intervals), battles and win fraction."""
        if not self.battles:
            return []
        table = ratings_table(list(self.battles), n_bootstrap=n_bootstrap, seed=self.seed)
        return [{"model": m, **{k: float(v) for k, v in row.items()}} for m, row in table.iterrows()]


def arena_app(outputs_paths, battles_path, seed: int = 0) -> FastAPI:
    """The arena web app: `/` (start), `/battle?voter=ID`, `/leaderboard`, and `/api/battle`,
    `/api/vote`, `/api/leaderboard`."""
    state = Arena(outputs_paths, battles_path, seed)
    app = FastAPI(title="prefgym arena")
    app.state.arena = state
    nav = "<p><a href='/'>start</a> · <a href='/leaderboard'>leaderboard</a></p>"

    def voter_id(voter: str | None) -> str:
        voter = (voter or "").strip()
        if not voter:
            raise HTTPException(400, "a voter id is required (?voter=ID)")
        return voter

    @app.get("/", response_class=HTMLResponse)
    def start():
        return _start_page("Arena: which answer is better?", "/battle", "voter")

    @app.get("/battle", response_class=HTMLResponse)
    def battle_page(voter: str | None = None):
        who = voter_id(voter)
        b = state.next_battle(who)
        buttons = "".join(f"<button name='vote' value='{v}'>{label}</button>" for v, label in
                          (("a", "A is better"), ("b", "B is better"), ("tie", "Tie"), ("bothbad", "Both are bad")))
        body = (nav + _prompt_html(b["instruction"], b["input"])
                + f"<div class='cols'><div><h3>Model A</h3><pre>{html.escape(b['output_a'])}</pre></div>"
                f"<div><h3>Model B</h3><pre>{html.escape(b['output_b'])}</pre></div></div>"
                f"<form method='post' action='/vote'><input type='hidden' name='voter' value='{html.escape(who)}'>"
                f"<input type='hidden' name='battle' value='{b['battle']}'>{buttons}</form>")
        return _page("Arena: which answer is better?", body)

    @app.post("/vote", response_class=HTMLResponse)
    async def vote_form(request: Request):
        form = await _form(request)
        who = voter_id(form.get("voter"))
        row = state.vote(who, _as_int(form.get("battle")), form.get("vote", ""))
        body = (nav + f"<p>Model A was <b>{html.escape(row['model_a'])}</b>, model B was "
                f"<b>{html.escape(row['model_b'])}</b>; your vote: {html.escape(row['winner'])}.</p>"
                f"<p><a href='/battle?voter={quote(who)}' autofocus>Next battle</a></p>")
        return _page("Thanks for voting", body)

    @app.get("/leaderboard", response_class=HTMLResponse)
    def leaderboard_page():
        rows = state.leaderboard()
        if not rows:
            return _page("Leaderboard", nav + "<p>No battles yet.</p>")
        head = "".join(f"<th>{h}</th>" for h in ("#", "model", "rating (BT)", "95% interval", "Elo", "battles",
                                                  "win rate"))
        cells = "".join(f"<tr><td>{i + 1}</td><td>{html.escape(r['model'])}</td><td>{r['bt_rating']:.0f}</td>"
                        f"<td>[{r['bt_lower']:.0f}, {r['bt_upper']:.0f}]</td><td>{r['elo_rating']:.0f}</td>"
                        f"<td>{r['n_battles']:.0f}</td><td>{100 * r['win_fraction']:.1f}%</td></tr>"
                        for i, r in enumerate(rows))
        return _page("Leaderboard", nav + f"<table><tr>{head}</tr>{cells}</table>")

    @app.get("/api/battle")
    def api_battle(voter: str | None = None):
        return state.next_battle(voter_id(voter))

    @app.post("/api/vote")
    def api_vote(payload: dict):
        return state.vote(voter_id(payload.get("voter")), _as_int(payload.get("battle")), payload.get("vote", ""))

    @app.get("/api/leaderboard")
    def api_leaderboard():
        return state.leaderboard()

    return app
