"""Secrets never reach MLflow: what the project logs (params, tags, the `config.yaml` artifact)
goes through `redact` first.

Four kinds of secret are masked as `***`:
- a value under a name that looks like a credential: any word of it is secret, password,
  passwd or credential(s), or its last word is token, key, apikey or pwd (`hf_token`,
  `model.kwargs.api_key`, `aws_secret_access_key`, `secretKey`; not `max_tokens` or
  `token_budget`) -- in a config tree, and in text as `name=value` or, in a YAML flow
  mapping, `{name: value}` (a refused `--set` echoes its value), for values of 6 characters
  or more and not inside a path (`/key=2024-01/`, a Hive partition);
- the password of a URI's user info (`http://user:pw@host` -> `http://user:***@host`), a
  user info that is a token alone (`https://ghp_...@github.com`: 20 characters or more,
  letters and digits, no colon), and a URI's query parameters of such names or signatures (Arrow's
  `s3://b/d?access_key=..&secret_key=..`, Azure's `sig=`, S3's `X-Amz-Signature=`);
- anywhere in a string, the value of an environment variable whose name looks like a
  credential (`MLFLOW_TRACKING_TOKEN=abc123...` set, `abc123...` masked wherever it appears),
  for values of 6 characters or more -- but the shell's working directories, `PWD` and
  `OLDPWD`, and a value that is a file's path (`GOOGLE_APPLICATION_CREDENTIALS=/x/key.json`):
  masking a path masked every line naming it, the printed store's included.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

MASK = "***"
_ANY_WORD = {"secret", "secrets", "password", "passwd", "credential", "credentials"}
_LAST_WORD = {"token", "key", "apikey", "pwd"}
_SHELL_DIRS = {"PWD", "OLDPWD"}  # the shell's, not credentials (`DB_PWD` is one)
# A URI's password runs to the last "@" of its authority (a password may hold "@": requests
# reads `http://me:p@ss@host` as password `p@ss`), which ends at "/", "?", "#" or whitespace.
_URI_PASSWORD = re.compile(
    r"(?P<head>[a-zA-Z][a-zA-Z0-9+.-]*://[^/?#@:\s]*:)[^/?#\s]+(?=@[^@/?#\s]*(?:[/?#\s]|$))")


# A URI (scheme://, to whitespace, a quote or a bracket: as it sits in JSON, a repr or a
# sentence), and a query parameter inside one (after "?" or "&"), its value to "&" or "#".
_URI = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://[^\s\"'<>()\[\]{},;]+")
_QUERY_PARAM = re.compile(r"(?P<head>[?&](?P<name>[A-Za-z0-9_.-]+)=)(?P<value>[^&#]*)")
_SIGNATURES = {"sig", "signature", "x-amz-signature"}  # (a query's signature: the URL's key)
# A user info that is one token (no password): long, one word of letters and digits, as
# GitHub's and GitLab's are (a long user name without a digit is a name).
_URI_TOKEN_USER = re.compile(
    r"(?P<head>[a-zA-Z][a-zA-Z0-9+.-]*://)(?=[^@/?#\s]*[0-9])(?=[^@/?#\s]*[A-Za-z])"
    r"[A-Za-z0-9_\-.~]{20,}(?=@)")
# `name=value` in text and `name: value` after a flow mapping's "{" or ",", the value 6
# characters or more (as the environment's: `key=len`, a traceback's keyword argument, is no
# secret), quoted or to a space, a comma, a bracket, a slash or a quote. Not a query's
# `?name=` or `&name=` (a URI's are masked above, one outside a URI is no credential), nor a
# path's `/key=2024-01/` (a Hive partition).
_NAMED_VALUE = re.compile(
    r"(?P<head>(?<![?&\w./-])(?P<name>[A-Za-z_][\w.-]*)=|(?<=[{,])\s*(?P<yname>[A-Za-z_][\w.-]*):\s+)"
    r"(?P<value>\"[^\"]{6,}\"|'[^']{6,}'|[^\s,;{}\[\]()&\"'/]{6,})")


def looks_secret(name: str) -> bool:
    """
    >>> [looks_secret(n) for n in ("HF_TOKEN", "model.kwargs.api_key", "AWS_SECRET_ACCESS_KEY")]
    [True, True, True]
    >>> [looks_secret(n) for n in ("batching.max_tokens", "token_budget", "train.seed")]
    [False, False, False]
    >>> [looks_secret(n) for n in ("secretKey", "accessToken", "HFToken", "maxTokens", "keyboard")]
    [True, True, True, False, False]
    """
    name = re.sub(r"([a-z0-9])([A-Z])|([A-Z])([A-Z][a-z])", r"\1\3_\2\4", name)  # camelCase
    words = [w for w in re.split(r"[^a-z0-9]+", name.lower()) if w]
    return bool(words) and (words[-1] in _LAST_WORD or any(w in _ANY_WORD for w in words))


def secret_env_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """The values of credential-named environment variables, longest first.

    >>> secret_env_values({"PWD": "/tmp/walk", "OLDPWD": "/home/me", "DB_PWD": "hunter22"})
    ['hunter22']
    """
    env = os.environ if environ is None else environ
    return sorted({v for k, v in env.items() if k not in _SHELL_DIRS and looks_secret(k)
                   and len(v) >= 6 and not _a_path(v)}, key=len, reverse=True)


def _a_path(value: str) -> bool:
    """Whether a value is the path of a file or folder that exists (a credential's file is
    named by it, not held in it)."""
    try:
        return value.startswith(("/", "~", "./")) and os.path.exists(os.path.expanduser(value))
    except (OSError, ValueError):
        return False


def redact_text(text: str, env_values: list[str] | None = None) -> str:
    """
    >>> redact_text("http://me:hunter22@127.0.0.1:5000/x and s3://bucket/k", [])
    'http://me:***@127.0.0.1:5000/x and s3://bucket/k'
    >>> redact_text("token=abcdef123 set", ["abcdef123"])
    'token=*** set'
    >>> redact_text("http://me:p@ss@127.0.0.1:5000 and http://you:x@h/y?a=b@c", [])
    'http://me:***@127.0.0.1:5000 and http://you:***@h/y?a=b@c'
    >>> redact_text("http://host:5000?to=a@b http://me:pw@h?x=1", [])  # no user info; a query
    'http://host:5000?to=a@b http://me:***@h?x=1'
    >>> redact_text("s3://b/d?access_key=AK&secret_key=S3CR&region=x gs://b?access_token=T", [])
    's3://b/d?access_key=***&secret_key=***&region=x gs://b?access_token=***'
    >>> redact_text('{"p": "s3://b/d?secret_key=X", "q": 1} see ?sort_key=name', [])
    '{"p": "s3://b/d?secret_key=***", "q": 1} see ?sort_key=name'
    >>> redact_text("https://a.blob.core.windows.net/c?sv=2022&sig=AbC%3D "
    ...             "https://ghp_0123456789abcdefghijKL@github.com/r", [])
    'https://a.blob.core.windows.net/c?sv=2022&sig=*** https://***@github.com/r'
    >>> redact_text("--set model.kwargs={api_key: hunter22, width: 8} and HF_TOKEN=hf_x123, seed=3", [])
    '--set model.kwargs={api_key: ***, width: 8} and HF_TOKEN=***, seed=3'
    >>> redact_text("config error: model.kwargs.api_key: Input should be a valid string", [])
    'config error: model.kwargs.api_key: Input should be a valid string'
    >>> redact_text("/data/key=2024-01/p.parquet sorted(x, key=len) mysql://db_admin_user_name@db", [])
    '/data/key=2024-01/p.parquet sorted(x, key=len) mysql://db_admin_user_name@db'
    """
    text = _URI_PASSWORD.sub(lambda m: m.group("head") + MASK, text)
    text = _URI_TOKEN_USER.sub(lambda m: m.group("head") + MASK, text)
    text = _URI.sub(lambda uri: _QUERY_PARAM.sub(_masked_param, uri.group(0)), text)
    text = _NAMED_VALUE.sub(_masked_named, text)
    for v in secret_env_values() if env_values is None else env_values:
        text = text.replace(v, MASK)
    return text


def _masked_param(m: re.Match[str]) -> str:
    """A query parameter with its value masked where its name looks like a credential."""
    name = m.group("name")
    if (looks_secret(name) or name.lower() in _SIGNATURES) and m.group("value"):
        return m.group("head") + MASK
    return m.group(0)


def _masked_named(m: re.Match[str]) -> str:
    """`name=value` (or a flow mapping's `name: value`) with its value masked where its name
    looks like a credential; null and a mask already there kept."""
    name = m.group("name") or m.group("yname")
    if looks_secret(name) and m.group("value").strip("'\"") not in ("", "null", "None", "~", MASK):
        return m.group("head") + MASK
    return m.group(0)


def redact(obj: Any, env_values: list[str] | None = None) -> Any:
    """A copy of a config tree (dicts, lists, scalars) or a flat {dotted name: value} mapping
    with secrets masked.

    >>> redact({"model": {"kwargs": {"api_key": "k-1", "width": 8}}, "uri": "http://a:b@h"}, env_values=[])
    {'model': {'kwargs': {'api_key': '***', 'width': 8}}, 'uri': 'http://a:***@h'}
    """
    env_values = secret_env_values() if env_values is None else env_values
    if isinstance(obj, Mapping):
        return {k: MASK if looks_secret(str(k)) and v is not None
                else redact(v, env_values) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(v, env_values) for v in obj)
    if isinstance(obj, str):
        return redact_text(obj, env_values)
    return obj
