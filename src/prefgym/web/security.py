"""Who is asking, and may they: access tokens, the admin token, sessions, CSRF, request limits.

- A labeller or voter opens the link an admin made for them (`/annotate?token=...`); the server
  checks the token against its hash in the database, sets an HttpOnly SameSite=Strict session
  cookie holding it, and redirects to the same page without the token in the address.
- Scripts send `Authorization: Bearer <token>` instead; a request authenticated that way cannot
  be forged by another site, so it needs no CSRF token.
- A request authenticated by cookie that changes something must come from this site: its Origin
  (or, without one, its Referer) must be this server, and it must carry the session's CSRF token
  (a form field `csrf`, or the `X-CSRF-Token` header for JSON). The CSRF token is an HMAC of the
  session's token hash under the server secret, so the server keeps no per-session state.
- The admin token comes from PREFGYM_ADMIN_TOKEN or is generated at start; only its hash is kept.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import time
from dataclasses import dataclass
from urllib.parse import parse_qs

from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse

from prefgym.web.store import Store, hash_token, new_token

ADMIN_ENV = "PREFGYM_ADMIN_TOKEN"
ADMIN = "admin"
COOKIES = {ADMIN: "prefgym_admin", "labeler": "prefgym_session", "voter": "prefgym_session"}
MAX_TOKEN_CHARS = 200
MAX_BODY_BYTES = 64 * 1024            # a label, a vote, a token request
MAX_ADMIN_BODY_BYTES = 64 * 1024 * 1024  # an upload of pairs or model outputs
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'; form-action 'self'",
    "X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff", "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


@dataclass(frozen=True)
class Principal:
    name: str
    role: str  # "labeler", "voter" or "admin"
    token_hash: str
    via: str  # "bearer" or "cookie"


def admin_token_from_env() -> tuple[str, bool]:
    """(the admin token, whether it was generated here) from PREFGYM_ADMIN_TOKEN or fresh."""
    token = os.environ.get(ADMIN_ENV, "").strip()
    if token:
        if len(token) < 16 or len(token) > MAX_TOKEN_CHARS:
            raise ValueError(f"{ADMIN_ENV} must be 16 to {MAX_TOKEN_CHARS} characters")
        return token, False
    return new_token(), True


class Guard:
    """Authentication and CSRF checks for one app (role: the non-admin role it serves)."""

    def __init__(self, store: Store, role: str, admin_token: str):
        self.store, self.role = store, role
        self.admin_hash = hash_token(admin_token)

    def sign(self, *parts) -> str:
        msg = "|".join(str(p) for p in parts).encode("utf-8")
        return hmac.new(self.store.secret, msg, hashlib.sha256).hexdigest()[:32]

    def csrf_token(self, who: Principal) -> str:
        return self.sign("csrf", who.role, who.token_hash)

    def _token(self, request: Request, role: str) -> tuple[str, str] | None:
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            return auth[7:].strip(), "bearer"
        cookie = request.cookies.get(COOKIES[role])
        return (cookie, "cookie") if cookie else None

    def identify(self, request: Request, role: str) -> Principal | None:
        """The principal of `role` ("admin" or this app's role) behind the request, or None."""
        found = self._token(request, role)
        if found is None or not 0 < len(found[0]) <= MAX_TOKEN_CHARS:
            return None
        token_hash = hash_token(found[0])
        if role == ADMIN:
            ok = hmac.compare_digest(token_hash, self.admin_hash)
            return Principal(ADMIN, ADMIN, token_hash, found[1]) if ok else None
        name = self.store.who(token_hash, role)
        return Principal(name, role, token_hash, found[1]) if name is not None else None

    def check_token(self, token: str, role: str) -> bool:
        if not 0 < len(token) <= MAX_TOKEN_CHARS:
            return False
        if role == ADMIN:
            return hmac.compare_digest(hash_token(token), self.admin_hash)
        return self.store.who(hash_token(token), role) is not None

    def require(self, request: Request, role: str) -> Principal:
        who = self.identify(request, role)
        if who is None:
            article = "an" if role == ADMIN else "a"
            raise HTTPException(401, f"{article} {role} token is required: open the link you were given, "
                                     "or send 'Authorization: Bearer <token>'")
        return who

    def check_csrf(self, request: Request, who: Principal, sent: str | None) -> None:
        """A cookie-authenticated change must come from this site and carry the session's CSRF token."""
        if who.via == "bearer":
            return
        here = f"{request.url.scheme}://{request.headers.get('host', '')}"
        origin = request.headers.get("origin")
        referer = request.headers.get("referer")
        if origin is not None:
            same = origin == here
        else:
            same = referer is not None and (referer == here or referer.startswith(here + "/"))
        if not same:
            raise HTTPException(403, "cross-site request refused (Origin/Referer is not this server)")
        if not sent or not hmac.compare_digest(str(sent), self.csrf_token(who)):
            raise HTTPException(403, "missing or wrong CSRF token; reload the page")

    def ticket(self, who: Principal, index: int) -> str:
        """A signed record of when a pair was shown to this person (for the time taken)."""
        t = f"{time.time():.3f}"
        return f"{index}.{t}.{self.sign('ticket', who.token_hash, index, t)}"

    def ticket_time(self, who: Principal, index: int, ticket: str | None) -> float | None:
        """Seconds since the ticket was issued; None without a ticket; 400 if it is not ours."""
        if ticket is None:
            return None
        parts = ticket.split(".", 1)
        if len(parts) == 2 and parts[0] == str(index) and "." in parts[1]:
            t, _, sig = parts[1].rpartition(".")
            if hmac.compare_digest(sig, self.sign("ticket", who.token_hash, index, t)):
                return round(max(0.0, time.time() - float(t)), 3)
        raise HTTPException(400, "field 'ticket': not a ticket issued to you for this pair")


class RedactTokens(logging.Filter):
    """Blank out `token=...` in log records (uvicorn's access log writes each request line)."""

    PATTERN = re.compile(r"(token=)[^&\s\"']+")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.args:
            record.args = tuple(self.PATTERN.sub(r"\1<redacted>", a) if isinstance(a, str) else a
                                for a in record.args)
        record.msg = self.PATTERN.sub(r"\1<redacted>", str(record.msg))
        return True


async def read_form(request: Request) -> dict[str, str]:
    """A url-encoded form body: at most 20 fields, each given once."""
    try:
        body = (await request.body()).decode("utf-8")
        parsed = parse_qs(body, keep_blank_values=True, max_num_fields=20, strict_parsing=bool(body))
    except (UnicodeDecodeError, ValueError):
        raise HTTPException(400, "malformed form body") from None
    repeated = [k for k, v in parsed.items() if len(v) > 1]
    if repeated:
        raise HTTPException(400, f"field '{repeated[0]}' given more than once")
    return {k: v[0] for k, v in parsed.items()}


class LimitsMiddleware:
    """Pure ASGI: POST bodies need a Content-Length under the limit (admin uploads get a larger
    one); every response gets the security headers."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if scope["method"] in ("POST", "PUT", "PATCH", "DELETE"):
            headers = dict(scope["headers"])
            limit = MAX_ADMIN_BODY_BYTES if scope["path"].startswith("/admin") else MAX_BODY_BYTES
            length = headers.get(b"content-length", b"").decode("latin-1")
            error = None
            if not length.isdigit():
                error = (411, "a Content-Length header is required")
            elif int(length) > limit:
                error = (413, f"request body over {limit} bytes")
            if error is not None:
                return await JSONResponse({"detail": error[1]}, status_code=error[0])(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                have = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k.lower().encode(), v.encode()) for k, v in SECURITY_HEADERS.items()
                         if k.lower().encode() not in have]
                message = {**message, "headers": list(message.get("headers", [])) + extra}
            await send(message)

        return await self.app(scope, receive, send_with_headers)
