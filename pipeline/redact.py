"""Secrets never reach MLflow: what the project logs (params, tags, the `config.yaml` artifact)
goes through `redact` first.

Three kinds of secret are masked as `***`:
- a value under a name that looks like a credential: any word of it is secret, password,
  passwd or credential(s), or its last word is token, key, apikey or pwd (`hf_token`,
  `model.kwargs.api_key`, `aws_secret_access_key`; not `max_tokens` or `token_budget`);
- the password of a URI's user info (`http://user:pw@host` -> `http://user:***@host`), and
  a URI's query parameters of such names (Arrow's `s3://b/d?access_key=..&secret_key=..`);
- anywhere in a string, the value of an environment variable whose name looks like a
  credential (`MLFLOW_TRACKING_TOKEN=abc123...` set, `abc123...` masked wherever it appears),
  for values of 6 characters or more -- but the shell's working directories, `PWD` and
  `OLDPWD` (a path: masking it masked every path under it, the printed store's included).
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


def looks_secret(name: str) -> bool:
    """
    >>> [looks_secret(n) for n in ("HF_TOKEN", "model.kwargs.api_key", "AWS_SECRET_ACCESS_KEY")]
    [True, True, True]
    >>> [looks_secret(n) for n in ("batching.max_tokens", "token_budget", "train.seed")]
    [False, False, False]
    """
    words = [w for w in re.split(r"[^a-z0-9]+", name.lower()) if w]
    return bool(words) and (words[-1] in _LAST_WORD or any(w in _ANY_WORD for w in words))


def secret_env_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """The values of credential-named environment variables, longest first.

    >>> secret_env_values({"PWD": "/tmp/walk", "OLDPWD": "/home/me", "DB_PWD": "hunter22"})
    ['hunter22']
    """
    env = os.environ if environ is None else environ
    return sorted({v for k, v in env.items()
                   if k not in _SHELL_DIRS and looks_secret(k) and len(v) >= 6}, key=len,
                  reverse=True)


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
    """
    text = _URI_PASSWORD.sub(lambda m: m.group("head") + MASK, text)
    text = _URI.sub(lambda uri: _QUERY_PARAM.sub(_masked_param, uri.group(0)), text)
    for v in secret_env_values() if env_values is None else env_values:
        text = text.replace(v, MASK)
    return text


def _masked_param(m: re.Match[str]) -> str:
    """A query parameter with its value masked where its name looks like a credential."""
    if looks_secret(m.group("name")) and m.group("value"):
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
