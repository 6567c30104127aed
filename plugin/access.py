"""Who may call the ``/ai/*`` routes that change anything, when Orthanc's
authentication is on.

Orthanc itself answers 401 to any request without valid credentials (the
plugin's routes included) before a filter is asked. What Orthanc does not
know is which of its users may retry a job or reprocess a study: that is
``AI.Administrators``, enforced here with the incoming-HTTP-request filter
(``orthanc.RegisterIncomingHttpRequestFilter``). Requests reach the filter
once Orthanc has checked their credentials; the filter refuses (False:
Orthanc's 403) a non-GET request under ``/ai/`` whose user is not an
administrator, and raises a security alert. Anything else is left alone.

orthanc-python 4.0 calls the filter as ``filter(uri, method=<int>, ip=<str>,
headers=<dict>[, get=<dict>])``: ``method`` is the C SDK's
``OrthancPluginHttpMethod`` (GET 1, POST 2, PUT 3, DELETE 4), ``headers``
are the request's headers with lower-case names, ``get`` the query (GET
only). The user name is not passed: it is the user part of the ``Basic``
credentials in the ``Authorization`` header, which Orthanc has already
checked against ``RegisteredUsers``. Seen on Orthanc 1.10.1: a request
without valid credentials gets its 401 without reaching the filter; the
URI is already normalised (``//ai/x`` arrives as ``/ai/x``); the requests
carrying the token of ``GenerateRestApiAuthorizationToken`` (the workers',
the plugin's own loopback calls) never reach it. Were one to, it has no
Basic user: allowed everywhere except the /ai routes that change anything,
which the workers never call. A return value other than a bool, or an
exception, is an error that Orthanc answers with a 500, so the filter
never raises.

Nothing heavy is imported here (it runs inside Orthanc, for every request).
"""

from __future__ import annotations

import base64
import binascii
import logging
import posixpath
from collections.abc import Callable, Iterable, Mapping
from typing import Any
from urllib.parse import unquote

log = logging.getLogger("orthanc_ai")

# OrthancPluginHttpMethod (the C SDK's enumeration, what orthanc-python passes).
METHODS = {1: "GET", 2: "POST", 3: "PUT", 4: "DELETE"}
GET = 1


def _alert(reason: str, user: str | None, method: str, uri: str, ip: str) -> None:
    """The single place a refusal is reported as a security alert.

    A warning in Orthanc's log and a Security Alert in the audit trail. No
    patient data: the user, the method, the path (Orthanc IDs only, no
    query) and the client address.
    """
    log.warning("orthanc-ai: security alert: %s %s %s by user %s from %s",
                reason, method, uri, user if user is not None else "(none)", ip)
    from engine.audit import current

    try:
        current().security_alert("restricted-function", f"{method} {uri}", reason,
                                 user=user or "", user_host=ip)
    except Exception:  # the filter must answer whatever the audit trail does
        log.exception("orthanc-ai: the security alert could not be audited")


def authentication_enabled(configuration: Mapping[str, Any]) -> bool:
    """Orthanc's own rule: ``AuthenticationEnabled`` if set, else the same as
    ``RemoteAccessAllowed`` (Orthanc 1.5.8 and later)."""
    explicit = configuration.get("AuthenticationEnabled")
    if isinstance(explicit, bool):
        return explicit
    return configuration.get("RemoteAccessAllowed") is True


def basic_user(headers: Mapping[str, str]) -> str | None:
    """The user name of ``Authorization: Basic ...``; None for anything else."""
    value = next((v for k, v in headers.items() if k.lower() == "authorization"), None)
    if not isinstance(value, str):
        return None
    scheme, _, credentials = value.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(credentials.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    user, colon, _ = decoded.partition(":")
    return user if colon else None


def is_ai_route(uri: str) -> bool:
    """``uri`` names something under /ai/, however it is spelt (%-escapes,
    doubled slashes, dot segments, case)."""
    path = unquote(uri.split("?", 1)[0])
    normal = posixpath.normpath("/" + path.replace("\\", "/"))
    first = normal.lstrip("/").split("/", 1)[0]
    return first.lower() == "ai"


def decide(uri: str, method: int, headers: Mapping[str, str],
           administrators: frozenset[str]) -> tuple[bool, str | None]:
    """(allowed, user): only a non-GET under /ai/ needs an administrator."""
    if method == GET or not is_ai_route(uri):
        return True, None
    user = basic_user(headers)
    return user is not None and user in administrators, user


def is_administrator(headers: Mapping[str, str] | None, administrators: Iterable[str],
                     authentication: bool) -> bool:
    """Whether the caller may retry and reprocess: anyone when Orthanc's
    authentication is off (nothing is enforced then), else a Basic user in
    ``administrators``. For what a page *shows*; the filter above *enforces*.
    orthanc-python 4.0 hands a REST callback the request's ``headers`` as it
    hands the filter; without them nobody is taken for an administrator."""
    if not authentication:
        return True
    user = basic_user(headers or {})
    return user is not None and user in frozenset(administrators)


def make_filter(administrators: Iterable[str]) -> Callable[..., bool]:
    """The callback for ``orthanc.RegisterIncomingHttpRequestFilter``."""
    admins = frozenset(administrators)

    def incoming_http_request_filter(uri: str, **request: Any) -> bool:
        method = request.get("method")
        try:
            allowed, user = decide(uri, method, request.get("headers") or {}, admins)
            if not allowed:
                _alert("refused", user, METHODS.get(method, str(method)), uri,
                       str(request.get("ip", "")))
            return bool(allowed)
        except Exception:  # never raise into Orthanc: fail closed on /ai, open elsewhere
            log.exception("orthanc-ai: access filter failed on %s", uri)
            try:
                return method == GET or not is_ai_route(uri)
            except Exception:
                return False

    return incoming_http_request_filter
