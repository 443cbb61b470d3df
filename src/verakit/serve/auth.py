"""Who may use which adapter: one API key for every inference route, or tenant keys from a keys file.

Semantics: `keys.grant(bearer)` is the `Grant` of the caller presenting `bearer` (None: no key matched),
and `grant.allows(name)` says whether it may use adapter `name`. A name outside the grant is answered
exactly like a name that does not exist (the app's 404), so a tenant cannot learn which names exist.

The keys file holds SHA-256 hashes, never keys (a stolen file opens nothing):

    {"keys": [{"sha256": "<64 hex digits>", "name": "acme", "adapters": ["acme-*", "shared"]}]}

`adapters` are names or fnmatch patterns (`*`, `?`, `[...]`, case-sensitive), matched against the whole
name. The file is re-read when its size, mtime or inode changes (one `stat` per request, cheaper than the
request's JSON parsing); a new file that cannot be read or parsed keeps the keys in force and logs an
error, so a half-saved edit never locks every tenant out.

No `from __future__ import annotations`: FastAPI must see the dependency's annotations as objects, not as
names of the function's local imports.
"""

import hashlib
import hmac
import json
import logging
import os
import threading
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

__all__ = ["EVERYONE", "Grant", "KeyFileError", "Keys", "caller_dependency", "hash_key", "read_keys_file"]

log = logging.getLogger(__name__)


def hash_key(key: str) -> str:
    """The keys file's `sha256` of `key`: lowercase hex of SHA-256 over its UTF-8 bytes."""
    return hashlib.sha256(key.encode()).hexdigest()


class KeyFileError(ValueError):
    """The keys file cannot be read or breaks the format; the message names the file and the entry."""


@dataclass(frozen=True)
class Grant:
    """What one key may use: `patterns` None means every adapter (the single --api-key, the admin token)."""

    name: str
    patterns: tuple[str, ...] | None

    def allows(self, adapter: str) -> bool:
        return self.patterns is None or any(fnmatchcase(adapter, p) for p in self.patterns)


EVERYONE = Grant("anyone", None)  # keys off: every caller may use every adapter


def read_keys_file(path: Path) -> list[tuple[bytes, Grant]]:
    """[(sha256 digest, grant)] of the keys file at `path`; KeyFileError naming the file and entry at fault."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise KeyFileError(f"keys file {path}: cannot read it: {e}") from None
    entries = doc.get("keys") if isinstance(doc, dict) else None
    if not isinstance(entries, list):
        raise KeyFileError(f'keys file {path}: expected {{"keys": [...]}} at the top level')
    out: list[tuple[bytes, Grant]] = []
    seen: set[bytes] = set()
    for i, e in enumerate(entries):
        where = f"keys file {path}: keys[{i}]"
        if not isinstance(e, dict) or set(e) - {"sha256", "name", "adapters"}:
            raise KeyFileError(f"{where} must be an object with sha256, adapters and optionally name")
        digest = e.get("sha256")
        if not isinstance(digest, str) or len(digest) != 64 or any(c not in "0123456789abcdefABCDEF" for c in digest):
            raise KeyFileError(f"{where}.sha256 must be 64 hex digits (verakit hash-key prints one)")
        adapters = e.get("adapters")
        if not isinstance(adapters, list) or not all(isinstance(a, str) and a for a in adapters):
            raise KeyFileError(f"{where}.adapters must be a list of adapter names or patterns")
        name = e.get("name", f"keys[{i}]")
        if not isinstance(name, str):
            raise KeyFileError(f"{where}.name must be a string")
        raw = bytes.fromhex(digest)
        if raw in seen:
            raise KeyFileError(f"{where}.sha256 repeats an earlier entry's")
        seen.add(raw)
        out.append((raw, Grant(name, tuple(adapters))))
    return out


class Keys:
    """The keys a server accepts on its inference routes: `api_key` and the admin token (every adapter),
    and the tenants of `keys_file` (their adapters), reloaded when the file changes."""

    def __init__(self, api_key: str | None, admin_token: str | None, keys_file: str | None) -> None:
        self._all = [hashlib.sha256(k.encode()).digest() for k in (api_key, admin_token) if k is not None]
        self._path = Path(keys_file) if keys_file is not None else None
        self._lock = threading.Lock()
        self._tenants: list[tuple[bytes, Grant]] = []
        self._stamp: tuple[int, int, int] | None = None
        if self._path is not None:
            self._stamp = self._stat()
            self._tenants = read_keys_file(self._path)  # at start-up a bad file is an error, not a log line

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self._path)  # type: ignore[arg-type]
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _refresh(self) -> None:
        stamp = self._stat()
        if stamp == self._stamp:
            return
        with self._lock:
            if stamp == self._stamp:
                return
            self._stamp = stamp  # a bad file is reported once, not on every request, until it changes again
            try:
                tenants = read_keys_file(self._path)  # type: ignore[arg-type]
            except KeyFileError as e:
                log.error("%s; keeping the %d keys in force", e, len(self._tenants))
                return
            self._tenants = tenants
            log.info("keys file %s reloaded: %d keys", self._path, len(tenants))

    def grant(self, bearer: str | None) -> Grant | None:
        """The grant of the key `bearer`, or None when it is missing or matches no key.

        Every stored hash is compared, in constant time, whatever matched: the time taken says nothing about
        which key (or how much of one) was right."""
        if bearer is None:
            return None
        if self._path is not None:
            self._refresh()
        digest = hashlib.sha256(bearer.encode()).digest()
        found: Grant | None = None
        for h in self._all:
            if hmac.compare_digest(h, digest):
                found = EVERYONE
        for h, g in self._tenants:
            if hmac.compare_digest(h, digest) and found is None:
                found = g
        return found


def caller_dependency(keys: Keys | None) -> Any:
    """The FastAPI dependency giving an inference route its caller's Grant: EVERYONE when `keys` is None (and
    nothing in the OpenAPI document), else the bearer key's grant, with 401 and `WWW-Authenticate: Bearer`
    for a missing or wrong key (the document then names the `apiKey` bearer scheme on the route)."""
    from typing import Annotated

    from fastapi import Depends, HTTPException
    from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

    if keys is None:
        def everyone() -> Grant:
            return EVERYONE
        return everyone
    api_bearer = HTTPBearer(auto_error=False, scheme_name="apiKey", description=(
        "an API key: the server's --api-key, a tenant key of its --keys-file, or its --admin-token"))

    def caller(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(api_bearer)]) -> Grant:
        grant = keys.grant(credentials.credentials if credentials is not None else None)
        if grant is None:
            raise HTTPException(401, "missing or wrong API key", headers={"WWW-Authenticate": "Bearer"})
        return grant
    return caller
