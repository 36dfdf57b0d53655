"""secrets: keep passwords out of what freezeflow prints, logs, tags and writes to reports.

`mask_url` replaces the password of one URL (`postgresql+psycopg2://user:pw@host/db` ->
`postgresql+psycopg2://user:***@host/db`, also a `password=` query value); everything else of the
URL is kept as written, so the masked URL still says which store it is. `mask_text` does the same
for every URL inside a message (a driver's error text that quotes the URL it was given).
Stdlib only: servers.py, which must not import the database drivers, uses it too.
"""

from __future__ import annotations

import re

from freezeflow.core.errors import first_line

MASK = "***"
# scheme://netloc: the netloc ends at the path, the query, the fragment or whitespace (in a message)
URL = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<netloc>[^\s/?#]*)(?P<rest>[^\s]*)")
# libpq and most drivers also take the password as a query parameter
QUERY_PASSWORD = re.compile(r"(?P<key>[?&;](?:password|passwd|pwd)=)[^&;#\s]*", re.IGNORECASE)


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
    """`text` with the password of every URL in it replaced by ***."""
    return URL.sub(mask_match, text)


def first_line_masked(exc: BaseException) -> str:
    """core.errors.first_line with any URL password in it masked: what adapters quote of a driver's error."""
    return mask_text(first_line(exc))
