"""secrets: keep passwords out of what freezeflow prints, logs, tags and writes to reports.

`mask_url` replaces the password of one URL (`postgresql+psycopg2://user:pw@host/db` ->
`postgresql+psycopg2://user:***@host/db`, also a `password=` query value); everything else of the
URL is kept as written, so the masked URL still says which store it is. `mask_text` does the same
for every URL inside a message (a driver's error text that quotes the URL it was given), and also
hides the value of `NAME=value` for secret-looking names (`MLFLOW_TRACKING_PASSWORD=...`,
`PREFECT_API_AUTH_STRING=...`) and of `Authorization: Basic ...` headers.
`read_secret` / `find_secret`: where a credential comes from, a file or an environment variable, never
the command line (which `ps` shows every user of the machine).
Stdlib only: servers.py, which must not import the database drivers, uses it too.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from freezeflow.core.errors import UserError, first_line

MASK = "***"
# scheme://netloc: the netloc ends at the path, the query, the fragment or whitespace (in a message)
URL = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<netloc>[^\s/?#]*)(?P<rest>[^\s]*)")
# libpq and most drivers also take the password as a query parameter
QUERY_PASSWORD = re.compile(r"(?P<key>[?&;](?:password|passwd|pwd)=)[^&;#\s]*", re.IGNORECASE)
# NAME=value where NAME says it is a secret: an environment variable (upper case: an environment dump, a
# shell line in an error message) or libpq's keyword/value form (`host=db password=...`)
SECRET_ASSIGNMENT = re.compile(r"(?P<key>\b(?:[A-Z0-9_]*(?:PASSWORD|PASSWD|AUTH_STRING|SECRET|TOKEN)[A-Z0-9_]*"
                               r"|password|passwd|pwd)=)(?P<quote>['\"]?)(?!\*\*\*)[^\s'\"]+(?P=quote)")
AUTH_HEADER = re.compile(r"(?P<key>\b(?:Basic|Bearer) )[A-Za-z0-9+/=._~-]{8,}")


def mask_netloc(netloc: str) -> str:
    """user:secret@host:port -> user:***@host:port; the last '@' ends the user info (as urlsplit reads
    it), so a password with a raw '@' in it is masked whole."""
    userinfo, at, hostport = netloc.rpartition("@")
    user, colon, password = userinfo.partition(":")
    if not at or not colon or not password:
        return netloc
    return f"{user}:{MASK}@{hostport}"


def mask_match(match: re.Match) -> str:
    rest = QUERY_PASSWORD.sub(lambda m: m.group("key") + MASK, match.group("rest"))
    return match.group("scheme") + mask_netloc(match.group("netloc")) + rest


def mask_url(url: str) -> str:
    """The URL with its password replaced by ***; a URL without one (or not a URL) comes back as is."""
    match = URL.match(url)
    if match is None:
        return url
    return mask_match(match) + url[match.end():]


def mask_text(text: str) -> str:
    """`text` with the password of every URL in it, secret `NAME=value` values and Authorization header
    credentials replaced by ***."""
    text = URL.sub(mask_match, text)
    text = SECRET_ASSIGNMENT.sub(lambda m: m.group("key") + MASK, text)
    return AUTH_HEADER.sub(lambda m: m.group("key") + MASK, text)


def first_line_masked(exc: BaseException) -> str:
    """core.errors.first_line with any URL password in it masked: what adapters quote of a driver's error."""
    return mask_text(first_line(exc))


# ---- where credentials come from ------------------------------------------------------------------

def read_secret(path: Path, option: str) -> str:
    """The first line of `path` (its newline dropped, spaces kept: they may be part of a password)."""
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or "not UTF-8 text"
        raise UserError(f"{option} {path}: cannot read it ({reason}); allowed: a readable file whose first "
                        "line is the secret") from None
    lines = text.splitlines()
    if not lines or not lines[0]:
        raise UserError(f"{option} {path}: its first line is empty; allowed: a file whose first line is the secret")
    return lines[0]


def find_secret(path: Path | None, option: str, envs: tuple[str, ...]) -> tuple[str, str] | None:
    """(secret, where it came from): the file `path` when given, else the first of `envs` that is set and
    not empty; None when there is none."""
    if path is not None:
        return read_secret(path, option), f"{option} {path}"
    for name in envs:
        if os.environ.get(name):
            return os.environ[name], name
    return None
