"""Dashboard authentication: pluggable backends and HMAC-signed session cookies."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import anyio.to_thread

from chancy.errors import ConfigurationError

_ITERATIONS = 120_000


@runtime_checkable
class AuthBackend(Protocol):
    """Checks a login. Returns the user name to show, or None to refuse."""

    async def authenticate(self, username: str, password: str) -> str | None: ...


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    """A PBKDF2-SHA256 hash of ``password`` (``pbkdf2_sha256$iterations$salt$hash``)."""
    salt = salt if salt is not None else secrets.token_bytes(16)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, _ITERATIONS)
    return f"pbkdf2_sha256${_ITERATIONS}${salt.hex()}${digest.hex()}"


def verify_password(password: str, encoded: str) -> bool:
    """Constant-time check of ``password`` against a :func:`hash_password` hash."""
    try:
        algorithm, iterations, salt, digest = encoded.split("$")
        rounds = int(iterations)
        salt_bytes = bytes.fromhex(salt)
    except ValueError:
        return False
    if algorithm != "pbkdf2_sha256":
        return False
    candidate = hashlib.pbkdf2_hmac("sha256", password.encode(), salt_bytes, rounds)
    return hmac.compare_digest(candidate.hex(), digest)


class PasswordAuth:
    """Fixed users. Passwords are kept only as salted PBKDF2 hashes: give plain
    passwords (hashed at start-up) or hashes from :func:`hash_password`."""

    def __init__(self, users: Mapping[str, str]) -> None:
        if not users:
            raise ConfigurationError("PasswordAuth needs at least one user")
        self._hashes: dict[str, str] = {}
        for name, secret in users.items():
            if not name or not secret:
                raise ConfigurationError("dashboard user names and passwords must not be empty")
            stored = secret if secret.startswith("pbkdf2_sha256$") else hash_password(secret)
            self._hashes[name] = stored
        # Unknown users are checked against a dummy hash so that timing does not tell
        # which user names exist.
        self._dummy = hash_password(secrets.token_urlsafe(16))

    async def authenticate(self, username: str, password: str) -> str | None:
        stored = self._hashes.get(username)
        ok = await anyio.to_thread.run_sync(verify_password, password, stored or self._dummy)
        return username if ok and stored is not None else None


class DjangoAuth:
    """Authenticates against Django's users (``django.contrib.auth``); by default only
    active staff may log in. Django must be configured before the dashboard starts."""

    def __init__(self, *, require_staff: bool = True) -> None:
        self.require_staff = require_staff

    def _check(self, username: str, password: str) -> str | None:
        from django.contrib.auth import authenticate  # type: ignore[import-not-found,unused-ignore]

        user: Any = authenticate(username=username, password=password)
        if user is None or not user.is_active:
            return None
        if self.require_staff and not user.is_staff:
            return None
        return str(user.get_username())

    async def authenticate(self, username: str, password: str) -> str | None:
        return await anyio.to_thread.run_sync(self._check, username, password)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Sessions:
    """Stateless sessions: the cookie holds the user, a random session id and an expiry,
    signed with HMAC-SHA256. Logged-out session ids are remembered until they expire."""

    def __init__(self, secret_key: str | bytes | None, *, max_age: int = 12 * 3600) -> None:
        if secret_key is None:
            key = secrets.token_bytes(32)
        elif isinstance(secret_key, str):
            key = secret_key.encode()
        else:
            key = secret_key
        if len(key) < 16:
            raise ConfigurationError("the dashboard secret key needs at least 16 bytes")
        self._key = hashlib.sha256(b"chancy-dashboard-session|" + key).digest()
        self._csrf_key = hashlib.sha256(b"chancy-dashboard-csrf|" + key).digest()
        self.max_age = max_age
        self._revoked: dict[str, float] = {}

    def _sign(self, payload: str) -> str:
        return _b64(hmac.new(self._key, payload.encode(), hashlib.sha256).digest())

    def issue(self, user: str) -> tuple[str, str]:
        """A new session for ``user``: (cookie value, session id)."""
        sid = secrets.token_urlsafe(18)
        body = {"u": user, "s": sid, "e": int(time.time()) + self.max_age}
        payload = _b64(json.dumps(body, separators=(",", ":")).encode())
        return f"{payload}.{self._sign(payload)}", sid

    def read(self, cookie: str | None) -> tuple[str, str] | None:
        """(user, session id) of a valid, unexpired, not logged-out cookie, else None."""
        if not cookie or len(cookie) > 4096 or "." not in cookie:
            return None
        payload, _, signature = cookie.partition(".")
        if not hmac.compare_digest(self._sign(payload), signature):
            return None
        try:
            body = json.loads(_unb64(payload))
            user, sid, expires = str(body["u"]), str(body["s"]), float(body["e"])
        except (ValueError, KeyError, TypeError):
            return None
        if expires < time.time() or sid in self._revoked:
            return None
        return user, sid

    def revoke(self, sid: str) -> None:
        """Forget a session (logout) for the rest of its lifetime."""
        now = time.time()
        self._revoked = {s: t for s, t in self._revoked.items() if t > now}
        self._revoked[sid] = now + self.max_age

    def csrf_token(self, sid: str) -> str:
        """The CSRF token bound to session ``sid``."""
        return _b64(hmac.new(self._csrf_key, sid.encode(), hashlib.sha256).digest())

    def check_csrf(self, sid: str, token: str | None) -> bool:
        """Constant-time check of a submitted CSRF token."""
        return bool(token) and hmac.compare_digest(self.csrf_token(sid), str(token))
