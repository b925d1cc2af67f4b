"""Request checks for the monitor, applied to every request before any route runs.

Loopback is not a trust boundary: any web page in the user's browser can send requests to
127.0.0.1:8080. So, even on loopback:

1. Host header allowlist (DNS rebinding): localhost, 127.0.0.1, [::1] (any port) plus
   ``monitor.allowed_hosts``; a missing or malformed Host is 400, another name is 421.
2. Method allowlist: GET and HEAD are safe; POST, PUT, PATCH, DELETE are "mutating"; any other
   method (OPTIONS included: a CORS preflight is never granted) is 405. No CORS headers, ever.
3. Every mutating request needs ``X-Trainer-Request: 1`` (a cross-site form cannot send a custom
   header, and a cross-site fetch with one needs a preflight we never grant), must not carry a
   foreign ``Origin`` (or, without Origin, a foreign ``Referer``), and must not be ``text/plain``
   or a url-encoded form (the two "simple" content types a cross-site page can send freely).
4. A token (when configured; required when bound to a non-loopback address) on every /api/ call
   and /metrics: ``Authorization: Bearer T`` or ``X-Trainer-Token: T``; GET/HEAD may also pass
   ``?token=T`` (EventSource cannot send headers).
5. Request bodies are capped before any parsing: Content-Length above the cap is refused at
   once, a chunked body is counted as it arrives.
"""
from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import re
from typing import Any, Awaitable, Callable, Iterable
from urllib.parse import parse_qs, unquote, urlsplit

from starlette.exceptions import HTTPException

log = logging.getLogger("monitor.security")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

SAFE_METHODS = frozenset({"GET", "HEAD"})
API_NOT_FOUND = "api_not_found"     # the name of the API's catch-all route (a 404 for any method)
MUTATING_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
ALLOWED_METHODS = SAFE_METHODS | MUTATING_METHODS
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
FORBIDDEN_CONTENT_TYPES = frozenset({"text/plain", "application/x-www-form-urlencoded"})
REQUEST_HEADER = "x-trainer-request"
TOKEN_HEADER = "x-trainer-token"
MAX_BODY_BYTES = 64 << 10               # any body but an upload's
# a refusal: status, detail and extra headers
Denial = tuple[int, str] | tuple[int, str, list[tuple[bytes, bytes]]]
UPLOAD_PATHS = frozenset({"/api/queue"})   # bodies capped at monitor.max_upload_bytes instead

CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; "
       "form-action 'none'; frame-ancestors 'none'")
NO_CSP_PREFIXES = ("/docs", "/redoc")      # FastAPI's API docs pages load their own scripts

_ENCODED_SLASH = re.compile(rb"%2f", re.IGNORECASE)
_HOST_RE = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<name>[A-Za-z0-9._-]+))(?::(?P<port>\d{1,5}))?$")


def is_loopback_bind(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    h = host.strip().strip("[]").lower()
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def parse_host(value: str) -> tuple[str, int | None] | None:
    """('name-or-ip', port) from a Host header value; None when malformed."""
    m = _HOST_RE.match(value.strip())
    if not m:
        return None
    name = (m.group("v6") or m.group("name") or "").lower().rstrip(".")
    if m.group("v6"):
        try:
            name = str(ipaddress.IPv6Address(name))
        except ValueError:
            return None
    port = int(m.group("port")) if m.group("port") else None
    if port is not None and not 0 < port < 65536:
        return None
    return name, port


def allowed_host_set(extra: Iterable[str], bind_host: str | None = None) -> frozenset[str]:
    names = set(LOOPBACK_NAMES)
    for h in extra:
        parsed = parse_host(h) or parse_host(f"[{h}]")
        if parsed:
            names.add(parsed[0])
    if bind_host and bind_host not in ("0.0.0.0", "::", ""):
        parsed = parse_host(bind_host) or parse_host(f"[{bind_host}]")
        if parsed:
            names.add(parsed[0])
    return frozenset(names)


def _origin_matches(url: str, host_header: str, scheme: str) -> bool:
    """Does the Origin/Referer URL name this very server (scheme, host and port as requested)?"""
    try:
        parts = urlsplit(url)
    except ValueError:
        return False
    if parts.scheme not in ("http", "https") or not parts.netloc or "@" in parts.netloc:
        return False
    a = parse_host(parts.netloc)
    b = parse_host(host_header)
    if a is None or b is None:
        return False
    default = {"http": 80, "https": 443}
    a_port = a[1] if a[1] is not None else default[parts.scheme]
    b_port = b[1] if b[1] is not None else default.get(scheme, 80)
    return a[0] == b[0] and a_port == b_port


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` when a body passes its cap. An HTTPException, so that FastAPI's body
    parsing (which turns other errors into 400) lets it through as a 413."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body is larger than the limit of {limit} bytes "
                              "(monitor.max_upload_bytes)")
        self.limit = limit


def token_required(path: str) -> bool:
    return path.startswith("/api/") or path == "/api" or path == "/metrics"


class SecurityMiddleware:
    """Pure ASGI middleware (runs before routing, for every method and path)."""

    def __init__(self, app: ASGIApp, *, allowed_hosts: Iterable[str] = (), token: str | None = None,
                 bind_host: str | None = None, max_upload_bytes: int = 256 << 20,
                 max_body_bytes: int = MAX_BODY_BYTES, upload_paths: Iterable[str] = UPLOAD_PATHS,
                 routes: list[Any] | None = None) -> None:
        self.app = app
        self.routes = routes if routes is not None else []   # the app's, to answer 405 with Allow
        self.allowed = allowed_host_set(allowed_hosts, bind_host)
        self.token = token.encode() if token else None
        self.max_upload_bytes = max_upload_bytes
        self.max_body_bytes = max_body_bytes
        self.upload_paths = frozenset(upload_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":         # the monitor has none: refuse outright
            await send({"type": "websocket.close", "code": 1008})
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope = _keep_encoded_slashes(scope)
        headers = _headers(scope)
        path: str = scope.get("path", "")
        method: str = scope.get("method", "GET").upper()
        denial = self._check_host(headers, method, path) or self._check_method(scope, method, path) \
            or self._check_token(scope, headers, method, path)
        if denial is None and method in MUTATING_METHODS:
            denial = self._check_change(scope, headers, method, path)
        if denial is not None:
            return await _deny(send, *denial)
        if method in MUTATING_METHODS:
            limit = self._body_limit(path)
            if "content-length" not in headers and path not in self.upload_paths:
                # a chunked body of unknown size: read it here (up to the small control limit), so
                # that the limit holds also for the routes that never read their body
                read = await _read_capped(receive, limit)
                if read is None:
                    return                              # the client went away
                if isinstance(read, int):
                    return await _deny(send, 413, f"request body is larger than the limit of "
                                       f"{read} bytes (monitor.max_body_bytes)")
                receive = _replayed(read, receive)
            receive = _limited(receive, limit)
        await self._respond(scope, receive, send, path, head=method == "HEAD")

    def _check_host(self, headers: dict[str, list[str]], method: str, path: str) -> Denial | None:
        hosts = headers.get("host", [])
        if len(hosts) != 1:
            return 400, "missing or repeated Host header"
        parsed = parse_host(hosts[0])
        if parsed is None:
            return 400, "malformed Host header"
        if parsed[0] not in self.allowed:
            log.warning("refused Host %r (%s %s)", hosts[0][:100], method, path[:200])
            return 421, (f"Host '{parsed[0][:100]}' is not allowed (DNS rebinding protection); add it "
                         "to monitor.allowed_hosts in config.json")
        return None

    def _check_method(self, scope: Scope, method: str, path: str) -> Denial | None:
        allow = self._allowed_methods(scope)
        if allow and method not in allow:
            return 405, f"method {method[:20]} not allowed on {path[:200]}", \
                [(b"allow", ", ".join(sorted(allow)).encode())]
        if method not in ALLOWED_METHODS:
            return 405, f"method {method[:20]} not allowed", [(b"allow", b"GET, HEAD, POST, PUT, PATCH, DELETE")]
        return None

    def _check_token(self, scope: Scope, headers: dict[str, list[str]], method: str, path: str) -> Denial | None:
        if self.token is None or not token_required(path) or self._token_ok(scope, headers, method):
            return None
        return 401, ("missing or wrong token: send 'Authorization: Bearer TOKEN' (open the dashboard "
                     "once as /?token=TOKEN)"), [(b"www-authenticate", b'Bearer realm="trainer-monitor"')]

    def _check_change(self, scope: Scope, headers: dict[str, list[str]], method: str, path: str) -> Denial | None:
        """A request that changes something: from the dashboard's own page, a body we accept."""
        if headers.get(REQUEST_HEADER, [""])[0].strip() != "1":
            return 403, ("missing 'X-Trainer-Request: 1' header: every change must carry it (web pages "
                         "of other sites cannot send it)")
        host, scheme = headers["host"][0], scope.get("scheme", "http")
        origin = headers.get("origin")
        if origin is not None:
            if len(origin) != 1 or not _origin_matches(origin[0], host, scheme):
                log.warning("refused foreign Origin %r on %s %s", origin[0][:100], method, path[:200])
                return 403, "foreign Origin: changes are accepted only from the dashboard's own page"
        elif "referer" in headers and not _origin_matches(headers["referer"][0], host, scheme):
            return 403, "foreign Referer: changes are accepted only from the dashboard's own page"
        ctype = headers.get("content-type", [""])[0].split(";")[0].strip().lower()
        if ctype in FORBIDDEN_CONTENT_TYPES:
            return 415, (f"Content-Type {ctype} is not accepted: send application/json (control) or a "
                         "JSONL upload")
        clen = headers.get("content-length")
        if clen is not None:
            try:
                n = int(clen[0])
            except ValueError:
                return 400, "malformed Content-Length"
            limit = self._body_limit(path)
            if n > limit:
                return 413, (f"request body of {n} bytes is larger than the limit of {limit} bytes "
                             "(monitor.max_upload_bytes)")
        return None

    def _body_limit(self, path: str) -> int:
        return self.max_upload_bytes if path in self.upload_paths else self.max_body_bytes

    async def _respond(self, scope: Scope, receive: Receive, send: Send, path: str, *, head: bool) -> None:
        """Run the app; every answer gets the security headers and loses CORS ones. HEAD is
        answered wherever GET is: the GET's status and headers, no body."""
        started = ended = False
        if head:
            scope = {**scope, "method": "GET"}

        async def send_wrapper(message: dict[str, Any]) -> None:
            nonlocal started, ended
            if message["type"] == "http.response.start":
                started = True
                hdrs = [(k, v) for k, v in message.get("headers", [])
                        if not k.lower().startswith(b"access-control-")]
                hdrs += _security_headers(path)
                message = {**message, "headers": hdrs}
            elif head and message["type"] == "http.response.body":
                if ended:
                    return                  # e.g. a stream's later events: the HEAD answer is over
                ended = True
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except BodyTooLarge as exc:
            if started:
                raise
            await _deny(send, 413, str(exc.detail))

    def _allowed_methods(self, scope: Scope) -> set[str]:
        """The methods the app's own routes answer at this path (HEAD wherever GET), asked of
        the routes themselves; empty when none matches (the static files, the API's catch-all 404)."""
        from starlette.routing import Match, Mount

        routes = [r for r in self.routes
                  if not isinstance(r, Mount) and getattr(r, "name", None) != API_NOT_FOUND]
        allow = {m for m in ("GET", "POST", "PUT", "PATCH", "DELETE")
                 if any(r.matches({**scope, "method": m})[0] is Match.FULL for r in routes)}
        if "GET" in allow:
            allow.add("HEAD")
        return allow

    def _token_ok(self, scope: Scope, headers: dict[str, list[str]], method: str) -> bool:
        assert self.token is not None
        candidates: list[str] = []
        for v in headers.get("authorization", []):
            scheme, _, cred = v.partition(" ")
            if scheme.lower() == "bearer":
                candidates.append(cred.strip())
        candidates += [v.strip() for v in headers.get(TOKEN_HEADER, [])]
        if method in SAFE_METHODS:
            qs = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            candidates += qs.get("token", [])
        return any(hmac.compare_digest(c.encode("utf-8", "replace"), self.token) for c in candidates)


def _keep_encoded_slashes(scope: Scope) -> Scope:
    """An encoded slash (%2F) is part of a path segment, never a separator: the path the routes see
    keeps it encoded, so a job name like ``x%2Fretry`` is a name (404), not another route (405)."""
    raw = scope.get("raw_path")
    if not raw or not _ENCODED_SLASH.search(raw):
        return scope
    parts = _ENCODED_SLASH.split(raw.split(b"?", 1)[0])
    return {**scope, "path": "%2F".join(unquote(p.decode("latin-1")) for p in parts)}


def _headers(scope: Scope) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for k, v in scope.get("headers", []):
        out.setdefault(k.decode("latin-1").lower(), []).append(v.decode("latin-1"))
    return out


def _security_headers(path: str) -> list[tuple[bytes, bytes]]:
    h = [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
         (b"referrer-policy", b"same-origin"), (b"cross-origin-resource-policy", b"same-origin"),
         (b"cross-origin-opener-policy", b"same-origin")]
    if not path.startswith(NO_CSP_PREFIXES):
        h.append((b"content-security-policy", CSP.encode()))
    if path.startswith("/api/") or path == "/metrics":
        h.append((b"cache-control", b"no-store"))
    return h


async def _read_capped(receive: Receive, limit: int) -> bytes | int | None:
    """A whole request body of unknown size, read up to *limit*: the bytes, *limit* when it is
    larger, None when the client went away."""
    body = b""
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        body += message.get("body", b"")
        if len(body) > limit:
            return limit
        if not message.get("more_body", False):
            return body


def _replayed(body: bytes, receive: Receive) -> Receive:
    """*receive* with its (already read) body handed out once more, first."""
    pending = True

    async def wrapped() -> dict[str, Any]:
        nonlocal pending
        if pending:
            pending = False
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()
    return wrapped


def _limited(receive: Receive, limit: int) -> Receive:
    seen = 0

    async def wrapped() -> dict[str, Any]:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise BodyTooLarge(limit)
        return message
    return wrapped


async def _deny(send: Send, status: int, detail: str,
                extra: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            *_security_headers("/api/"), *(extra or [])]})
    await send({"type": "http.response.body", "body": body})
