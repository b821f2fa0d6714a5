"""Secrets in URIs: what a message or log must never show, and where a URI's password goes
instead (the environment, which never reaches a Ray worker's runtime environment)."""

from __future__ import annotations

import os
import re
import urllib.parse


def credentials_to_environment(uri: str) -> str:
    """`uri` without its `user:password@`, which moves to MLFLOW_TRACKING_USERNAME / _PASSWORD
    in this process's environment (unless those are set already).

    The bare URI is what travels to Ray workers (the runtime environment and task arguments are
    visible in Ray's dashboard); the credentials reach a local cluster's workers through the
    environment they inherit, and every node of a remote cluster brings its own, as for S3.
    """
    parts = urllib.parse.urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user, has_password, password = userinfo.partition(":")
    os.environ.setdefault("MLFLOW_TRACKING_USERNAME", urllib.parse.unquote(user))
    if has_password:
        os.environ.setdefault("MLFLOW_TRACKING_PASSWORD", urllib.parse.unquote(password))
    return urllib.parse.urlunsplit(parts._replace(netloc=hostport))


# user:password@ (or a lone user or token) in a URI: what a message or log must never show.
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/?#@\s]*)@")


def redact_uri(text: str) -> str:
    """`text` (a URI, or a message holding URIs) with the credentials of every URI hidden:
    `https://alice:S3CRET@host` -> `https://alice:***@host`; a user part without a password may be
    a token, so it becomes `***`."""

    def hide(match: re.Match) -> str:
        user, sep, _ = match["userinfo"].partition(":")
        return f"{match['scheme']}{user}:***@" if sep else f"{match['scheme']}***@"

    return _USERINFO.sub(hide, str(text))
