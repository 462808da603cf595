"""Refusing what a web page can make the user's browser send to a server on the user's own machine.

A loopback server is out of the network's reach but not of the browser's: any page the user visits may POST
to `http://127.0.0.1:8000` (a `text/plain` body, or no Content-Type at all, needs no CORS preflight, so the
request runs even though the page cannot read the answer), and by DNS rebinding (its own name re-resolved to
127.0.0.1) the page becomes same-origin with the server and reads the answers too. Ollama refuses both with
its Host and Origin checks (`OLLAMA_ORIGINS`); this is the same policy.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from mmcompose.errors import MMComposeError
from mmcompose.serve.schema import ServeError

#: Methods whose body the server reads; their Content-Type must be JSON.
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def is_loopback(name: str | None) -> bool:
    """`localhost`, a `*.localhost` name (browsers resolve those to loopback themselves, RFC 6761) or a
    loopback address (127.0.0.0/8, ::1)."""
    if not name:
        return False
    name = name.lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _hostname(host_header: str) -> str | None:
    """The name in a Host header (`localhost:8000` -> `localhost`, `[::1]:8000` -> `::1`)."""
    try:
        return urlsplit(f"//{host_header}").hostname
    except ValueError:  # an unbalanced `[`
        return None


def parse_origins(values: Iterable[str]) -> frozenset[str]:
    """`--allowed-origins` values (each one origin or several comma-separated) as browsers write origins (lower
    case, no path, no trailing slash); `*` allows every origin. Anything else is a one-line error naming it."""
    origins = set()
    for value in (part for given in values for part in given.split(",") if part.strip()):
        origin = value.strip().rstrip("/").lower()
        if origin != "*" and not _is_origin(origin):
            raise MMComposeError(f"--allowed-origins {value!r}: not an origin; give scheme://host[:port] "
                                 "(e.g. http://localhost:3000) or *")
        origins.add(origin)
    return frozenset(origins)


def _is_origin(text: str) -> bool:
    try:
        parts = urlsplit(text)
        _ = parts.port  # raises ValueError unless the port is a number in 0-65535
    except ValueError:
        return False
    return (parts.scheme in ("http", "https") and bool(parts.hostname) and "@" not in parts.netloc
            and not (parts.path or parts.query or parts.fragment))


class BrowserGuard:
    """ASGI middleware refusing, before anything else runs, with a 403 or 415 OpenAI-style error object:

    * a Host header that names neither a loopback name nor a loopback address, when the server is bound to
      loopback (`check_host`): DNS rebinding. The port is not compared (an SSH tunnel from another local port
      is legitimate); a server bound to another address is reachable by any name, and its protection is
      `--api-key`.
    * an `Origin` other than the server's own (`scheme://` + the Host header, what the served page sends) and
      not in `origins`: cross-origin requests.
    * a body-carrying request whose Content-Type is not `application/json` (415): a page can send
      `text/plain` without a preflight, `application/json` it cannot.

    Starlette has both neighbours, and neither does this. `TrustedHostMiddleware` answers a bad Host with a
    400 in plain text and knows no loopback addresses beyond a list of names. `CORSMiddleware` only decides
    which CORS headers a response gets: a simple (preflight-free) request from any origin still runs, its
    answer merely unreadable to the page. It is still used, inside this guard, to answer the preflights of
    `origins` and add their headers.
    """

    def __init__(self, app: ASGIApp, *, origins: frozenset[str], check_host: bool) -> None:
        self.app, self.origins, self.check_host = app, origins, check_host

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            error = self.refusal(scope["scheme"], scope["method"], Headers(scope=scope))
            if error is not None:
                await JSONResponse(error.body(), status_code=error.status)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def refusal(self, scheme: str, method: str, headers: Headers) -> ServeError | None:
        host = headers.get("host", "")
        if self.check_host and not is_loopback(_hostname(host)):
            return ServeError(403, f"Host {host!r} refused: this server is bound to loopback and answers only "
                                   "to localhost, 127.0.0.1 or [::1] (a foreign name is DNS rebinding)",
                              code="host_not_allowed")
        origin = headers.get("origin")
        if origin is not None and not self.allows(origin.lower(), f"{scheme}://{host}".lower()):
            return ServeError(403, f"cross-origin request from {origin} refused; start the server with "
                                   f"--allowed-origins {origin} to allow that page", code="origin_not_allowed")
        media_type = headers.get("content-type", "").partition(";")[0].strip().lower()
        if method in BODY_METHODS and media_type != "application/json":
            return ServeError(415, f"Content-Type {media_type or '(none)'} refused: send the body as application/json",
                              code="unsupported_media_type")
        return None

    def allows(self, origin: str, own: str) -> bool:
        return origin == own or "*" in self.origins or origin in self.origins
