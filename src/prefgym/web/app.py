"""The human side: a pairwise annotation page and an arena of anonymous battles with a leaderboard.

Two small FastAPI apps with server-rendered HTML and a JSON API alongside (for scripts and tests),
both on one SQLite database (`prefgym.web.store`): every label and vote is committed before it is
acknowledged, and a restart resumes where each person left off.

- People come in through links an admin makes (`/admin`): each link carries an access token, and
  the label or vote is stored under the token's name, never a name the request claims
  (`prefgym.web.security`). Every request field is checked by a pydantic model (4xx, never 5xx).
- `annotation_app(db, pairs)`: pairs (instruction, input, output_1, output_2) are shown one at a
  time under the labelling guidelines, in a seeded left/right order per (labeler, pair); each label
  is stored with the swap undone, in AlpacaFarm's convention (preference 1, 2, or 1.5 for a tie),
  with the labeler, the time taken and the page version.
- `arena_app(db, outputs_files)`: an instruction and two anonymous outputs from two generators; the
  names are shown only after the vote; each vote is a Chatbot Arena battle (model_a, model_b,
  winner, judge, tstamp). The leaderboard is recomputed only when the votes have changed.
"""

from __future__ import annotations

import hashlib
import html
import json
import threading
import time
from pathlib import Path
from typing import Annotated, Callable, Literal, Optional

from fastapi import Body, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from prefgym.data import load_records
from prefgym.data.loading import validate_records
from prefgym.errors import DataError
from prefgym.evaluation import ratings_table
from prefgym.seeding import rng_for, stable_hash
from prefgym.web.security import (ADMIN, COOKIES, Guard, LimitsMiddleware, Principal, admin_token_from_env,
                                  read_form)
from prefgym.web.store import Store, read_jsonl_tolerant

PAGE_VERSION = "2"  # bump when the annotation page changes what a labeller sees
ARENA_VOTES = {"a": "model_a", "b": "model_b", "tie": "tie", "bothbad": "tie (bothbad)"}
MAX_INDEX = 10**9
MAX_UPLOAD_RECORDS = 100_000
STATIC = Path(__file__).parent / "static"
DEFAULT_GUIDELINES = """\
Read the instruction (and its input, if any), then both responses.
Pick the response that follows the instruction better: correct, helpful, complete and clear.
Do not prefer a response just because it is longer. Judge content, not style.
If both are equally good or equally bad, choose Tie.
Keys: 1 or Left arrow = left is better, 2 or Right arrow = right is better, 3 or T = tie."""

Name = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=64,
                                        pattern=r"^[\w.@+-]+( [\w.@+-]+)*$")]
Key = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$")]
Ticket = Annotated[str, StringConstraints(max_length=200)]
Index = Annotated[int, Field(ge=0, le=MAX_INDEX)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class LabelIn(_Request):
    index: Index
    choice: Literal["left", "right", "tie"]
    ticket: Optional[Ticket] = None
    idempotency_key: Optional[Key] = None


class VoteIn(_Request):
    battle: Index
    vote: Literal["a", "b", "tie", "bothbad"]
    idempotency_key: Optional[Key] = None


class TokenIn(_Request):
    name: Name


class _Form(BaseModel):
    """Form fields arrive as strings: lax parsing, plus the CSRF token."""
    model_config = ConfigDict(extra="forbid")
    csrf: Annotated[str, StringConstraints(max_length=200)] = ""


class LabelForm(_Form, LabelIn):
    model_config = ConfigDict(extra="forbid", strict=False)


class VoteForm(_Form, VoteIn):
    model_config = ConfigDict(extra="forbid", strict=False)


class TokenForm(_Form, TokenIn):
    model_config = ConfigDict(extra="forbid", strict=False)


def _validation_message(errors) -> str:
    e = errors[0]
    loc = [str(p) for p in e.get("loc", ()) if p not in ("body", "query")]
    where = f"field '{'.'.join(loc)}': " if loc else ""
    return where + e.get("msg", "invalid")


def _parse(model, data: dict):
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise HTTPException(422, _validation_message(e.errors())) from None


# --- pages -----------------------------------------------------------------------------------

def _page(title: str, body: str, *, csrf: str = "", scripts: tuple[str, ...] = ("keys.js",),
          status: int = 200) -> HTMLResponse:
    meta = f"<meta name='csrf-token' content='{html.escape(csrf)}'>" if csrf else ""
    js = "".join(f"<script src='/static/{s}' defer></script>" for s in scripts)
    return HTMLResponse(f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                        f"<link rel='stylesheet' href='/static/style.css'>{meta}{js}</head>"
                        f"<body><h1>{html.escape(title)}</h1>{body}</body></html>", status_code=status)


def _prompt_html(instruction: str, input: str) -> str:
    text = f"<h3>Instruction</h3><pre class='prompt'>{html.escape(instruction)}</pre>"
    return text + (f"<h3>Input</h3><pre class='prompt'>{html.escape(input)}</pre>" if input else "")


def _hidden(**fields) -> str:
    return "".join(f"<input type='hidden' name='{k}' value='{html.escape(str(v))}'>" for k, v in fields.items())


def _buttons(items) -> str:
    return "".join(f"<button name='{name}' value='{value}' data-key='{keys}'>{html.escape(label)}</button>"
                   for name, value, label, keys in items)


def _base_app(title: str, store: Store, guard: Guard, home: str) -> FastAPI:
    app = FastAPI(title=title, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(LimitsMiddleware)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.state.store, app.state.guard = store, guard

    def is_api(request: Request) -> bool:
        return request.url.path.startswith(("/api/", "/admin/api/"))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        if is_api(request):
            return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)
        return _page("Sorry", f"<p>{html.escape(str(exc.detail))}</p>", status=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        return JSONResponse({"detail": _validation_message(exc.errors())}, status_code=422)

    @app.exception_handler(DataError)
    async def data_error(request: Request, exc: DataError):
        return JSONResponse({"detail": str(exc)}, status_code=400)

    @app.get("/", response_class=HTMLResponse)
    def start(request: Request):
        if guard.identify(request, guard.role):
            return RedirectResponse(home, status_code=303)
        return _page(title, "<p>Open the personal link you were given. Links are made by the admin at "
                            "<code>/admin</code>.</p>", scripts=())

    return app


def _enter(request: Request, guard: Guard, role: str, token: str | None):
    """A link with ?token=: check it, keep it in a session cookie, and drop it from the address."""
    if token is None:
        return None
    if not guard.check_token(token, role):
        raise HTTPException(401, "this link is not valid (mistyped or revoked); ask the admin for a new one")
    response = RedirectResponse(request.url.path, status_code=303)
    response.set_cookie(COOKIES[role], token, max_age=30 * 24 * 3600, httponly=True, samesite="strict", path="/",
                        secure=request.url.scheme == "https")
    return response


def _add_admin(app: FastAPI, guard: Guard, *, noun: str, load: Callable[[list, str], dict],
               progress: Callable[[], list[dict]], export: Callable[[], list[dict]], home: str) -> None:
    """Admin pages and API: make and revoke links, load data (`noun`), progress per person, export."""
    store, role = guard.store, guard.role

    def link(request: Request, token: str) -> str:
        return f"{str(request.base_url).rstrip('/')}{home}?token={token}"

    def make_token(request: Request, name: str) -> dict:
        try:
            token = store.create_token(name, role)
        except ValueError as e:
            raise HTTPException(409, str(e)) from None
        return {"name": name, "role": role, "token": token, "link": link(request, token)}

    def page(request: Request, who: Principal, made: dict | None = None) -> HTMLResponse:
        csrf = guard.csrf_token(who)
        made_html = ("" if made is None else f"<p class='made'>Link for <b>{html.escape(made['name'])}</b> "
                     f"(shown once; send it privately): <code id='new-link'>{html.escape(made['link'])}</code></p>")
        rows = "".join(
            f"<tr><td>{html.escape(p['name'])}</td><td>{p['done']}</td><td>{p.get('median_seconds') or ''}</td>"
            f"<td><form method='post' action='/admin/revoke'>{_hidden(csrf=csrf, name=p['name'])}"
            f"<button>revoke</button></form></td></tr>" for p in progress())
        body = (f"{made_html}<h2>People</h2><form method='post' action='/admin/tokens'>{_hidden(csrf=csrf)}"
                f"<label>New {role}: <input name='name' required maxlength='64'></label> <button>Make link</button>"
                f"</form><table><tr><th>{role}</th><th>done</th><th>median s</th><th></th></tr>{rows}</table>"
                f"<h2>Data</h2><p>Load {noun} (.json list or .jsonl): <input type='file' id='upload' "
                f"data-url='/admin/api/{noun}' accept='.json,.jsonl'> <span id='upload-result'></span></p>"
                f"<p><a href='/admin/api/export' download>Export</a> (JSON, for prefgym's analysis commands)</p>")
        return _page(f"Admin: {app.title}", body, csrf=csrf, scripts=("admin.js",))

    @app.get("/admin", response_class=HTMLResponse)
    def admin_page(request: Request, token: Optional[str] = None):
        return _enter(request, guard, ADMIN, token) or page(request, guard.require(request, ADMIN))

    @app.post("/admin/tokens", response_class=HTMLResponse)
    async def admin_token_form(request: Request):
        who = guard.require(request, ADMIN)
        form = _parse(TokenForm, await read_form(request))
        guard.check_csrf(request, who, form.csrf)
        return page(request, who, made=make_token(request, form.name))

    @app.post("/admin/revoke")
    async def admin_revoke_form(request: Request):
        who = guard.require(request, ADMIN)
        form = _parse(TokenForm, await read_form(request))
        guard.check_csrf(request, who, form.csrf)
        store.revoke_token(form.name, role)
        return RedirectResponse("/admin", status_code=303)

    @app.post("/admin/api/tokens")
    def api_token(request: Request, payload: TokenIn):
        guard.check_csrf(request, guard.require(request, ADMIN), request.headers.get("x-csrf-token"))
        return make_token(request, payload.name)

    @app.post("/admin/api/revoke")
    def api_revoke(request: Request, payload: TokenIn):
        guard.check_csrf(request, guard.require(request, ADMIN), request.headers.get("x-csrf-token"))
        return {"revoked": store.revoke_token(payload.name, role)}

    @app.post(f"/admin/api/{noun}")
    def api_load(request: Request, payload: Annotated[list, Body()]):
        guard.check_csrf(request, guard.require(request, ADMIN), request.headers.get("x-csrf-token"))
        if len(payload) > MAX_UPLOAD_RECORDS:
            raise HTTPException(413, f"at most {MAX_UPLOAD_RECORDS} records per upload")
        return load(payload, "upload")

    @app.get("/admin/api/progress")
    def api_progress(request: Request):
        guard.require(request, ADMIN)
        return progress()

    @app.get("/admin/api/export")
    def api_export(request: Request):
        guard.require(request, ADMIN)
        return JSONResponse(export(), headers={"Content-Disposition": f"attachment; filename=\"{noun}-export.json\""})


# --- annotation page -------------------------------------------------------------------------

class Annotation:
    """Pairs to label and the labels so far, all in the database."""

    def __init__(self, store: Store, labels_per_pair: int = 1, guidelines: str = DEFAULT_GUIDELINES):
        if labels_per_pair < 1:
            raise DataError("--labels-per-pair must be at least 1")
        self.store, self.labels_per_pair, self.guidelines = store, labels_per_pair, guidelines
        digest = hashlib.sha256(guidelines.encode("utf-8")).hexdigest()[:8]
        self.page_version = f"annotate-{PAGE_VERSION}+guidelines-{digest}"

    def add_pairs(self, rows: list, source) -> dict:
        pairs = validate_records(rows, required=("instruction", "output_1", "output_2"), path=source)
        return {"added": self.store.add_pairs(pairs), "total": self.store.n_pairs()}

    def swapped(self, labeler: str, index: int) -> bool:
        """Whether output_2 is shown on the left for this labeler (seeded, stable across restarts)."""
        return stable_hash("annotate-swap", labeler, index) % 2 == 1

    def progress(self, labeler: str) -> dict:
        done, mine = self.store.label_counts(labeler)
        return {"done": done, "total": self.store.n_pairs() * self.labels_per_pair, "done_by_you": mine}

    def next_pair(self, labeler: str) -> dict:
        """The open pair with the fewest labels that this labeler has not labelled, shown left/right."""
        i = self.store.open_pair(labeler, self.labels_per_pair)
        if i is None:
            return {"index": None, **self.progress(labeler)}
        p = self.store.pair(i)
        left, right = (p["output_2"], p["output_1"]) if self.swapped(labeler, i) else (p["output_1"], p["output_2"])
        return {"index": i, "instruction": p["instruction"], "input": p.get("input") or "", "left": left,
                "right": right, **self.progress(labeler)}

    def label(self, labeler: str, index: int, choice: str, seconds: float | None, key: str | None) -> dict:
        """Store a choice (left / right / tie) with the swap undone; returns the stored row. A retry with
        the same idempotency key returns the row already stored."""
        preference = 1.5
        if choice != "tie":
            preference = 2 if (choice == "left") == self.swapped(labeler, index) else 1
        with self.store.tx() as db:
            if key is not None:
                old = db.execute("SELECT * FROM labels WHERE idempotency_key=?", (key,)).fetchone()
                if old is not None:
                    if (old["labeler"], old["pair_idx"]) != (labeler, index):
                        raise HTTPException(409, "this idempotency key was used for another label")
                    return self._row(old)
            if db.execute("SELECT 1 FROM pairs WHERE idx=?", (index,)).fetchone() is None:
                raise HTTPException(404, f"no pair {index}")
            if db.execute("SELECT 1 FROM labels WHERE pair_idx=? AND labeler=?", (index, labeler)).fetchone():
                raise HTTPException(409, f"{labeler} already labelled pair {index}")
            cur = db.execute(
                "INSERT INTO labels (pair_idx, labeler, preference, time_per_example, page_version, tstamp, "
                "idempotency_key) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (index, labeler, preference, seconds, self.page_version, time.time(), key))
            row = db.execute("SELECT * FROM labels WHERE id=?", (cur.lastrowid,)).fetchone()
        return self._row(row)

    def _row(self, label, record: str | None = None) -> dict:
        """A label as an AlpacaFarm cross-annotation row: the pair's fields, preference, annotator,
        time_per_example, page_version, tstamp and index (the pair's number)."""
        pair = json.loads(record) if record is not None else self.store.pair(label["pair_idx"])
        return {**pair, "input": pair.get("input") or "", "preference": label["preference"],
                "annotator": label["labeler"], "time_per_example": label["time_per_example"],
                "page_version": label["page_version"], "tstamp": label["tstamp"], "index": label["pair_idx"]}

    def export(self) -> list[dict]:
        return [self._row(r, r["record"]) for r in self.store.labels()]

    def people(self) -> list[dict]:
        stats = {r["labeler"]: r for r in self.store.query(
            "SELECT labeler, count(*) AS n, group_concat(time_per_example) AS times FROM labels GROUP BY labeler")}
        out = []
        for name in sorted(set(self.store.names("labeler")) | set(stats)):
            row = stats.get(name)
            times = sorted(float(t) for t in (row["times"] or "").split(",") if t) if row else []
            median = round(times[len(times) // 2], 1) if times else None
            out.append({"name": name, "done": row["n"] if row else 0, "median_seconds": median})
        return out


def annotation_app(db, pairs=None, *, labels_per_pair: int = 1, guidelines: str | None = None,
                   admin_token: str | None = None, import_jsonl=None) -> FastAPI:
    """The annotation web app on the database `db`; `pairs` (a file) is loaded at start if given,
    `import_jsonl` (an old labels.jsonl) is imported. Pages: `/annotate`, `/admin`; API: `/api/next`,
    `/api/label`, `/admin/api/...`. The admin token: `admin_token`, else PREFGYM_ADMIN_TOKEN, else a
    new one (in `app.state.admin_token`, for the command to print)."""
    store = Store(db)
    state = Annotation(store, labels_per_pair, guidelines if guidelines is not None else DEFAULT_GUIDELINES)
    if pairs is not None:
        state.add_pairs(load_records(pairs, required=("instruction", "output_1", "output_2")), pairs)
        if not store.n_pairs():
            raise DataError("no pairs to annotate", path=pairs)
    if import_jsonl is not None:
        import_labels(state, import_jsonl)
    token = admin_token or admin_token_from_env()[0]
    guard = Guard(store, "labeler", token)
    app = _base_app("Which response is better?", store, guard, "/annotate")
    app.state.annotation, app.state.admin_token = state, token

    @app.get("/annotate", response_class=HTMLResponse)
    def annotate_page(request: Request, token: Optional[str] = None):
        entered = _enter(request, guard, "labeler", token)
        if entered is not None:
            return entered
        who = guard.require(request, "labeler")
        nxt = state.next_pair(who.name)
        progress = (f"<p class='progress'>{nxt['done']} / {nxt['total']} labels done "
                    f"({nxt['done_by_you']} by you, {html.escape(who.name)})</p>")
        guide = (f"<details class='guidelines' {'open' if nxt['done_by_you'] == 0 else ''}><summary>Guidelines"
                 f"</summary><pre>{html.escape(state.guidelines)}</pre></details>")
        if nxt["index"] is None:
            return _page("Thank you", progress + "<p>Nothing left for you to label.</p>")
        buttons = _buttons((("choice", "left", "Left is better", "1 ArrowLeft"),
                            ("choice", "right", "Right is better", "2 ArrowRight"), ("choice", "tie", "Tie", "3 t")))
        body = (guide + progress + _prompt_html(nxt["instruction"], nxt["input"])
                + f"<div class='cols'><div><h3>Left</h3><pre id='left'>{html.escape(nxt['left'])}</pre></div>"
                f"<div><h3>Right</h3><pre id='right'>{html.escape(nxt['right'])}</pre></div></div>"
                f"<form method='post' action='/label'>"
                f"{_hidden(csrf=guard.csrf_token(who), index=nxt['index'], ticket=guard.ticket(who, nxt['index']))}"
                f"{buttons}</form><p><small>Keys: 1 or &larr; left, 2 or &rarr; right, 3 or t tie.</small></p>")
        return _page("Which response is better?", body)

    def do_label(request: Request, who: Principal, payload: LabelIn) -> dict:
        seconds = guard.ticket_time(who, payload.index, payload.ticket)
        return state.label(who.name, payload.index, payload.choice, seconds, payload.idempotency_key)

    @app.post("/label")
    async def label_form(request: Request):
        who = guard.require(request, "labeler")
        form = _parse(LabelForm, await read_form(request))
        guard.check_csrf(request, who, form.csrf)
        do_label(request, who, form)
        return RedirectResponse("/annotate", status_code=303)

    @app.get("/api/next")
    def api_next(request: Request):
        who = guard.require(request, "labeler")
        nxt = state.next_pair(who.name)
        return {**nxt, "ticket": guard.ticket(who, nxt["index"])} if nxt["index"] is not None else nxt

    @app.post("/api/label")
    def api_label(request: Request, payload: LabelIn):
        who = guard.require(request, "labeler")
        guard.check_csrf(request, who, request.headers.get("x-csrf-token"))
        return do_label(request, who, payload)

    _add_admin(app, guard, noun="pairs", load=state.add_pairs, progress=state.people, export=state.export,
               home="/annotate")
    return app


def import_labels(state: Annotation, path) -> int:
    """Import an old labels.jsonl (rows with index, annotator, preference): a torn last line is
    skipped with a warning; rows already imported are skipped. Returns how many were added."""
    rows = read_jsonl_tolerant(path)
    n_pairs, added = state.store.n_pairs(), 0
    with state.store.tx() as db:
        for i, r in enumerate(rows):
            if not isinstance(r.get("index"), int) or not 0 <= r["index"] < n_pairs:
                raise DataError("not a pair of the loaded pairs; is this the labels file of another pairs file?",
                                path=path, row=i, field="index")
            if r.get("preference") not in (1, 2, 1.5):
                raise DataError("must be 1, 2 or 1.5", path=path, row=i, field="preference")
            seconds = r.get("time_per_example")
            added += db.execute(
                "INSERT OR IGNORE INTO labels (pair_idx, labeler, preference, time_per_example, page_version, "
                "tstamp) VALUES (?, ?, ?, ?, ?, ?)",
                (r["index"], str(r.get("annotator") or "anonymous"), float(r["preference"]),
                 float(seconds) if isinstance(seconds, (int, float)) else None, "jsonl-import",
                 float(r.get("tstamp") or 0.0))).rowcount
    return added


# --- arena -----------------------------------------------------------------------------------

class Arena:
    """Model outputs grouped by instruction, the battles dealt and the votes, all in the database;
    the leaderboard is cached under the votes' version and recomputed only when that changes."""

    def __init__(self, store: Store, seed: int = 0, n_bootstrap: int = 50):
        self.store, self.seed, self.n_bootstrap = store, seed, n_bootstrap
        self.board_lock = threading.Lock()
        self.board: tuple[tuple[int, int], list[dict]] | None = None
        self.n_computed = 0  # how many times the leaderboard was computed (for tests and the admin)
        self._load_prompts()

    def _load_prompts(self) -> None:
        by_prompt: dict[tuple[str, str], dict[str, str]] = {}
        for r in self.store.outputs():
            by_prompt.setdefault((r["instruction"], r["input"]), {})[r["generator"]] = r["output"]
        # only instructions answered by at least two generators can make a battle
        self.by_prompt = by_prompt
        self.prompts = [k for k, gens in by_prompt.items() if len(gens) >= 2]

    def add_outputs(self, rows: list, source) -> dict:
        records = validate_records(rows, required=("instruction", "output", "generator"), path=source)
        for i, r in enumerate(records):
            if not isinstance(r["generator"], str) or not r["generator"]:
                raise DataError("must be a non-empty string", path=source, row=i, field="generator")
        added = self.store.add_outputs(records)
        self._load_prompts()
        return {"added": added, "instructions_with_battles": len(self.prompts)}

    def next_number(self, voter: str) -> int:
        rows = self.store.query("SELECT coalesce(max(number) + 1, 0) AS n FROM battles WHERE judge=?", (voter,))
        return rows[0]["n"]

    def next_battle(self, voter: str) -> dict:
        """The voter's next battle (dealt once, seeded by the voter and the number), without names."""
        if not self.prompts:
            return {"battle": None, "message": "no battles yet: the admin has not loaded outputs of two generators"}
        number = self.next_number(voter)
        with self.store.tx() as db:
            dealt = db.execute("SELECT * FROM dealt WHERE judge=? AND number=?", (voter, number)).fetchone()
            if dealt is None:
                rng = rng_for("arena", self.seed, voter, number)
                instruction, input = self.prompts[int(rng.integers(len(self.prompts)))]
                model_a, model_b = rng.choice(sorted(self.by_prompt[(instruction, input)]), size=2,
                                              replace=False).tolist()
                db.execute("INSERT INTO dealt VALUES (?, ?, ?, ?, ?, ?)",
                           (voter, number, instruction, input, model_a, model_b))
                dealt = {"instruction": instruction, "input": input, "model_a": model_a, "model_b": model_b}
        gens = self.by_prompt[(dealt["instruction"], dealt["input"])]
        return {"battle": number, "instruction": dealt["instruction"], "input": dealt["input"],
                "output_a": gens[dealt["model_a"]], "output_b": gens[dealt["model_b"]]}

    def vote(self, voter: str, number: int, vote: str, key: str | None = None) -> dict:
        with self.store.tx() as db:
            if key is not None:
                old = db.execute("SELECT * FROM battles WHERE idempotency_key=?", (key,)).fetchone()
                if old is not None:
                    if (old["judge"], old["number"]) != (voter, number):
                        raise HTTPException(409, "this idempotency key was used for another vote")
                    return self._row(old)
            expected = db.execute("SELECT coalesce(max(number) + 1, 0) FROM battles WHERE judge=?",
                                  (voter,)).fetchone()[0]
            if number != expected:
                raise HTTPException(409, f"battle {number} is not {voter}'s current battle (already voted?)")
            dealt = db.execute("SELECT * FROM dealt WHERE judge=? AND number=?", (voter, number)).fetchone()
            if dealt is None:
                raise HTTPException(409, f"battle {number} was not shown to {voter} yet")
            cur = db.execute(
                "INSERT INTO battles (judge, number, model_a, model_b, winner, instruction, input, tstamp, "
                "idempotency_key) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (voter, number, dealt["model_a"], dealt["model_b"], ARENA_VOTES[vote], dealt["instruction"],
                 dealt["input"], time.time(), key))
            row = db.execute("SELECT * FROM battles WHERE id=?", (cur.lastrowid,)).fetchone()
        return self._row(row)

    @staticmethod
    def _row(b) -> dict:
        """A vote as a Chatbot Arena battle."""
        return {"model_a": b["model_a"], "model_b": b["model_b"], "winner": b["winner"],
                "instruction": b["instruction"], "input": b["input"], "judge": b["judge"], "tstamp": b["tstamp"]}

    def leaderboard(self) -> tuple[int, list[dict]]:
        """(number of battles, rows): Bradley–Terry and online Elo ratings (95% bootstrap intervals),
        battles and win fraction; recomputed only when a vote has been stored since the last time."""
        with self.board_lock:
            version = self.store.battles_version()
            if self.board is None or self.board[0] != version:
                battles = self.store.battles()
                rows = []
                if battles:
                    table = ratings_table(battles, n_bootstrap=self.n_bootstrap, seed=self.seed)
                    rows = [{"model": m, **{k: float(v) for k, v in row.items()}} for m, row in table.iterrows()]
                self.board, self.n_computed = (version, rows), self.n_computed + 1
            return self.board[0][0], self.board[1]

    def people(self) -> list[dict]:
        votes = {r["judge"]: r["n"] for r in self.store.query("SELECT judge, count(*) AS n FROM battles GROUP BY judge")}
        return [{"name": n, "done": votes.get(n, 0)} for n in sorted(set(self.store.names("voter")) | set(votes))]


def arena_app(db, outputs=(), *, seed: int = 0, admin_token: str | None = None, import_jsonl=None,
              n_bootstrap: int = 50) -> FastAPI:
    """The arena web app on the database `db`; `outputs` (model_outputs files) are loaded at start.
    Pages: `/battle`, `/leaderboard`, `/admin`; API: `/api/battle`, `/api/vote`, `/api/leaderboard`."""
    store = Store(db)
    state = Arena(store, seed, n_bootstrap)
    for path in outputs:
        state.add_outputs(load_records(path, required=("instruction", "output", "generator")), path)
    if outputs and not state.prompts:
        raise DataError("no instruction has outputs from two different generators; give the model_outputs "
                        "files of at least two generators on the same instructions",
                        path=", ".join(str(p) for p in outputs))
    if import_jsonl is not None:
        import_battles(store, import_jsonl)
    token = admin_token or admin_token_from_env()[0]
    guard = Guard(store, "voter", token)
    app = _base_app("Arena: which answer is better?", store, guard, "/battle")
    app.state.arena, app.state.admin_token = state, token
    nav = "<p class='nav'><a href='/battle'>battle</a> · <a href='/leaderboard'>leaderboard</a></p>"

    def voter_or_admin(request: Request) -> Principal:
        return guard.identify(request, "voter") or guard.require(request, ADMIN)

    @app.get("/battle", response_class=HTMLResponse)
    def battle_page(request: Request, token: Optional[str] = None):
        entered = _enter(request, guard, "voter", token)
        if entered is not None:
            return entered
        who = guard.require(request, "voter")
        b = state.next_battle(who.name)
        if b["battle"] is None:
            return _page("Arena", nav + f"<p>{html.escape(b['message'])}</p>")
        buttons = _buttons((("vote", "a", "A is better", "a 1 ArrowLeft"), ("vote", "b", "B is better", "b 2 ArrowRight"),
                            ("vote", "tie", "Tie", "t 3"), ("vote", "bothbad", "Both are bad", "x 4")))
        body = (nav + _prompt_html(b["instruction"], b["input"])
                + f"<div class='cols'><div><h3>Model A</h3><pre id='output-a'>{html.escape(b['output_a'])}</pre></div>"
                f"<div><h3>Model B</h3><pre id='output-b'>{html.escape(b['output_b'])}</pre></div></div>"
                f"<form method='post' action='/vote'>{_hidden(csrf=guard.csrf_token(who), battle=b['battle'])}"
                f"{buttons}</form><p><small>Keys: a, b, t (tie), x (both bad).</small></p>")
        return _page("Arena: which answer is better?", body)

    @app.post("/vote", response_class=HTMLResponse)
    async def vote_form(request: Request):
        who = guard.require(request, "voter")
        form = _parse(VoteForm, await read_form(request))
        guard.check_csrf(request, who, form.csrf)
        row = state.vote(who.name, form.battle, form.vote, form.idempotency_key)
        body = (nav + f"<p id='reveal'>Model A was <b>{html.escape(row['model_a'])}</b>, model B was "
                f"<b>{html.escape(row['model_b'])}</b>; your vote: {html.escape(row['winner'])}.</p>"
                f"<p><a href='/battle' id='next' data-key='n Enter'>Next battle</a> (key n)</p>")
        return _page("Thanks for voting", body)

    @app.get("/leaderboard", response_class=HTMLResponse)
    def leaderboard_page(request: Request):
        voter_or_admin(request)
        n, rows = state.leaderboard()
        if not rows:
            return _page("Leaderboard", nav + "<p>No battles yet.</p>")
        head = "".join(f"<th>{h}</th>" for h in ("#", "model", "rating (BT)", "95% interval", "Elo", "battles",
                                                  "win rate"))
        cells = "".join(f"<tr><td>{i + 1}</td><td class='model'>{html.escape(r['model'])}</td>"
                        f"<td>{r['bt_rating']:.0f}</td><td>[{r['bt_lower']:.0f}, {r['bt_upper']:.0f}]</td>"
                        f"<td>{r['elo_rating']:.0f}</td><td>{r['n_battles']:.0f}</td>"
                        f"<td>{100 * r['win_fraction']:.1f}%</td></tr>" for i, r in enumerate(rows))
        return _page("Leaderboard", nav + f"<p id='n-battles'>{n} battles</p><table>"
                                          f"<tr>{head}</tr>{cells}</table>")

    @app.get("/api/battle")
    def api_battle(request: Request):
        return state.next_battle(guard.require(request, "voter").name)

    @app.post("/api/vote")
    def api_vote(request: Request, payload: VoteIn):
        who = guard.require(request, "voter")
        guard.check_csrf(request, who, request.headers.get("x-csrf-token"))
        return state.vote(who.name, payload.battle, payload.vote, payload.idempotency_key)

    @app.get("/api/leaderboard")
    def api_leaderboard(request: Request):
        voter_or_admin(request)
        return state.leaderboard()[1]

    _add_admin(app, guard, noun="outputs", load=state.add_outputs, progress=state.people,
               export=lambda: [{k: b[k] for k in ("model_a", "model_b", "winner", "instruction", "input", "judge",
                                                  "tstamp")} for b in store.battles()], home="/battle")
    return app


def import_battles(store: Store, path) -> int:
    """Import an old battles.jsonl: a torn last line is skipped with a warning. Each old vote keeps
    its judge and order; rows already imported are skipped. Returns how many were added."""
    from prefgym.evaluation.ratings import validate_battles

    rows = read_jsonl_tolerant(path)
    if not rows:
        return 0
    validate_battles(rows, path=path)
    added = 0
    with store.tx() as db:
        numbers: dict[str, int] = {}
        for i, b in enumerate(rows):
            judge = str(b.get("judge") or "anonymous")
            n = numbers[judge] = numbers.get(judge, -1) + 1
            added += db.execute(
                "INSERT OR IGNORE INTO battles (judge, number, model_a, model_b, winner, instruction, input, tstamp, "
                "idempotency_key) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (judge, n, b["model_a"], b["model_b"], b["winner"], str(b.get("instruction") or ""),
                 str(b.get("input") or ""), float(b.get("tstamp") or 0.0), f"import:{judge}:{n}")).rowcount
    return added
