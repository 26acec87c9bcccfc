"""Keeping secrets out of what the project prints and records.

A tracking URI such as ``http://alice:s3cret@host:5000`` or a storage URL such as
``postgresql://search:s3cret@db/optuna`` carries a password. Every URL the project prints,
logs as a parameter or tag, or stores in an Optuna study goes through :func:`redact_url`
first, and two servers are compared by :func:`server_identity`, never by their credentials.

This module imports nothing beyond the standard library.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

MASK = "***"
# Query parameters that carry secrets in database and HTTP URLs (libpq, SQLAlchemy, tokens).
SECRET_QUERY_KEYS = ("password", "passwd", "pwd", "token", "access_token", "secret", "api_key", "apikey")


def _split(url: str):
    try:
        return urlsplit(url)
    except ValueError:
        return None


def url_has_secret(url: str) -> bool:
    """Whether ``url`` holds a password in its user part or a secret in its query string."""
    parts = _split(url)
    if parts is None:
        return False
    try:
        password = parts.password
    except ValueError:
        password = None
    secret_query = any(key.lower() in SECRET_QUERY_KEYS for key, _ in parse_qsl(parts.query, keep_blank_values=True))
    return bool(password) or secret_query


def redact_url(url: str) -> str:
    """``url`` with any password (and secret query value) replaced by ``***``; the rest unchanged."""
    if not url or "://" not in url or not url_has_secret(url):
        # Unchanged, slashes and all: urlunsplit would turn sqlite:////abs/path into sqlite://abs/path.
        return url
    parts = _split(url)
    if parts is None:
        return MASK
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        user = userinfo.partition(":")[0]
        netloc = f"{user}:{MASK}@{hostport}" if ":" in userinfo else f"{user}@{hostport}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(key.lower() in SECRET_QUERY_KEYS for key, _ in pairs):
            query = urlencode(
                [(key, MASK if key.lower() in SECRET_QUERY_KEYS else value) for key, value in pairs], safe="*"
            )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def server_identity(url: str) -> tuple[str, str, int | None, str]:
    """What names a server: scheme, host, port and path, without user name or password.

    Two workers whose tracking URIs differ only in their credentials use the same server.
    """
    parts = _split(url or "")
    if parts is None or not parts.scheme:
        return ("", url or "", None, "")
    try:
        port = parts.port
    except ValueError:
        port = None
    default_ports = {"http": 80, "https": 443}
    return (
        parts.scheme.lower(),
        (parts.hostname or "").lower(),
        port or default_ports.get(parts.scheme.lower()),
        parts.path.rstrip("/"),
    )


def without_credentials(url: str) -> str:
    """``url`` with no user name or password at all: a link for a browser, which asks for them itself."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
