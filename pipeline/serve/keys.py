"""Client keys of ``aipipe serve``: the ``AIPIPE_API_KEYS`` TOML file mapping each client key to a user.

A ``[keys]`` table, each entry ``"<client key>" = "<user>"``. With it, every
call needs a known ``Authorization: Bearer`` key, and that key's user is the
request's ``user``; without it the endpoint is open (development only). Only
SHA-256 digests of the keys are kept in memory, compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import tomllib
from collections.abc import Mapping
from pathlib import Path

from pipeline.runtime.settings import Settings


class ServeConfigError(ValueError):
    """``aipipe serve`` cannot start: bad ``AIPIPE_API_KEYS`` file, production without keys, port taken."""


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


class ApiKeys:
    """Client keys and the user each one stands for; only SHA-256 digests are kept in memory.

    Args:
        keys: ``{client key: user}``.

    Raises:
        ServeConfigError: when there is no key, or a key or user is empty.
    """

    def __init__(self, keys: Mapping[str, str]) -> None:
        if not keys:
            raise ServeConfigError("the client key file defines no key")
        self._users: dict[bytes, str] = {}
        for key, user in keys.items():
            if not isinstance(key, str) or not key.strip():
                raise ServeConfigError("a client key is empty")
            if not isinstance(user, str) or not user.strip() or len(user) > 256:
                raise ServeConfigError("every client key needs a user name of 1 to 256 characters")
            self._users[_digest(key)] = user

    def __len__(self) -> int:
        return len(self._users)

    def __repr__(self) -> str:
        return f"ApiKeys({len(self)} keys)"

    @classmethod
    def from_file(cls, path: Path) -> ApiKeys:
        """Read the TOML key file named by ``AIPIPE_API_KEYS``.

        Format: a ``[keys]`` table, each entry ``"<client key>" = "<user>"``.

        Raises:
            ServeConfigError: when the file is missing, not TOML, or has no valid ``[keys]`` table
                (the message never quotes a key).
        """
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ServeConfigError(f"AIPIPE_API_KEYS: file not found: {path}") from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise ServeConfigError(f"AIPIPE_API_KEYS: cannot read {path}: {exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ServeConfigError(f"AIPIPE_API_KEYS: {path} is not valid TOML ({exc})") from None
        keys = data.get("keys")
        if not isinstance(keys, dict):
            raise ServeConfigError(f'AIPIPE_API_KEYS: {path} needs a [keys] table of "<client key>" = "<user>"')
        try:
            return cls(keys)
        except ServeConfigError as exc:
            raise ServeConfigError(f"AIPIPE_API_KEYS: {path}: {exc}") from None

    def user_for(self, key: str) -> str | None:
        """The user of client key ``key``, or ``None`` when the key is unknown."""
        digest = _digest(key)
        for known, user in self._users.items():
            if hmac.compare_digest(known, digest):
                return user
        return None


def api_keys_for(settings: Settings) -> ApiKeys | None:
    """The client keys of ``AIPIPE_API_KEYS``; ``None`` (an open endpoint) when unset in development.

    Raises:
        ServeConfigError: when the file is invalid, or in ``production`` without ``AIPIPE_API_KEYS``.
    """
    if settings.api_keys_path is not None:
        return ApiKeys.from_file(settings.api_keys_path)
    if settings.env_name == "production":
        raise ServeConfigError(
            "refusing to serve an open endpoint in production: set AIPIPE_API_KEYS to a TOML file "
            'with a [keys] table ("<client key>" = "<user>")'
        )
    return None
