"""mask_url / mask_text: the one place passwords are taken out of URLs before they are shown."""

from __future__ import annotations

import pytest

from freezeflow.core.errors import UserError
from freezeflow.integrations.secrets import mask_text, mask_url


@pytest.mark.parametrize("url, masked", [
    ("postgresql+psycopg2://u:pw@h/db", "postgresql+psycopg2://u:***@h/db"),
    ("postgresql+psycopg2://user:s3cret@db.example:5432/optuna",
     "postgresql+psycopg2://user:***@db.example:5432/optuna"),
    ("http://u:pw@h", "http://u:***@h"),
    ("https://u:pw@h:5000/path?x=1", "https://u:***@h:5000/path?x=1"),
    ("mysql://:pw@h/db", "mysql://:***@h/db"),  # a password without a user
    ("postgresql://u:p@ss@h/db", "postgresql://u:***@h/db"),  # a raw '@' in the password: masked whole
    ("postgresql://u@h/db?sslmode=require&password=pw", "postgresql://u@h/db?sslmode=require&password=***"),
])
def test_password_is_masked_and_the_rest_kept(url, masked):
    assert mask_url(url) == masked
    assert "pw" not in masked and "s3cret" not in masked


@pytest.mark.parametrize("url", [
    "postgresql+psycopg2://u@h:5432/db",  # a user, no password
    "http://h:5000",
    "sqlite:////tmp/x/optuna.db",
    "sqlite:///:memory:",
    "http://u:@h/db",  # an empty password: nothing to hide
    "",
])
def test_url_without_password_is_unchanged(url):
    assert mask_url(url) == url


@pytest.mark.parametrize("url, masked", [
    ("postgresql://u:pw@h:notaport/db", "postgresql://u:***@h:notaport/db"),  # urlsplit's .port would raise
    ("postgresql://u:pw@[::1/db", "postgresql://u:***@[::1/db"),  # unclosed IPv6 bracket
    ("u:pw@h/db", "u:pw@h/db"),  # no scheme: not a URL, nothing is guessed
    ("not a url", "not a url"),
    ("redis://host", "redis://host"),
])
def test_malformed_urls_never_raise(url, masked):
    assert mask_url(url) == masked


def test_every_url_in_a_message_is_masked():
    text = ("could not connect to 'postgresql://a:one@h1/db' (then tried http://b:two@h2:5000), "
            "sqlite:///x.db is fine")
    assert mask_text(text) == ("could not connect to 'postgresql://a:***@h1/db' (then tried http://b:***@h2:5000), "
                               "sqlite:///x.db is fine")
    assert mask_text("no url here: user:pw") == "no url here: user:pw"


def test_servers_errors_show_the_url_masked():
    from freezeflow.integrations.servers import check_backend_store_uri, check_prefect_database

    with pytest.raises(UserError) as bad_store:
        check_backend_store_uri("mysql://u:pw@h/db")
    assert "mysql://u:***@h/db" in str(bad_store.value) and "pw" not in str(bad_store.value)
    with pytest.raises(UserError) as bad_db:
        check_prefect_database("postgresql+psycopg2://u:pw@h/db")
    assert "postgresql+psycopg2://u:***@h/db" in str(bad_db.value) and ":pw@" not in str(bad_db.value)


def test_tune_and_tracking_messages_show_the_url_masked():
    from freezeflow.integrations.secrets import first_line_masked
    from freezeflow.integrations.tune import check_storage_url

    with pytest.raises(UserError, match=r"--storage: 'redis://u:\*\*\*@h/0' is not allowed"):
        check_storage_url("redis://u:pw@h/0", "--storage")
    assert first_line_masked(RuntimeError("cannot open http://u:pw@h:5000\nsecond line")) == "cannot open http://u:***@h:5000"
