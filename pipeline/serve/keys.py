"""Client and operator keys of ``aipipe serve``: the ``AIPIPE_API_KEYS`` TOML file.

A ``[keys]`` table, each entry ``"<client key>" = "<user>"``: with it, every
call needs a known ``Authorization: Bearer`` key, and that key's user is the
request's ``user``; without the file the endpoint is open (development only).
An ``[operators]`` table, each entry ``"<operator key>" = "<name>"``, names
the keys that open the operator dashboard (DESIGN A12); a client key does not.
Only SHA-256 digests of the keys are kept in memory, compared in constant time.
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


def _digests(keys: Mapping[str, str], what: str, noun: str) -> dict[bytes, str]:
    out: dict[bytes, str] = {}
    for key, name in keys.items():
        if not isinstance(key, str) or not key.strip():
            raise ServeConfigError(f"a{'n' if what[0] in 'aeiou' else ''} {what} key is empty")
        if not isinstance(name, str) or not name.strip() or len(name) > 256:
            raise ServeConfigError(f"every {what} key needs a {noun} of 1 to 256 characters")
        out[_digest(key)] = name
    return out


class ApiKeys:
    """Client keys and the user each one stands for, and operator keys; only SHA-256 digests are kept in memory.

    Args:
        keys: ``{client key: user}``.
        operators: ``{operator key: operator name}`` (the dashboard's keys).

    Raises:
        ServeConfigError: when there is no key at all, or a key or name is empty.
    """

    def __init__(self, keys: Mapping[str, str], operators: Mapping[str, str] | None = None) -> None:
        if not keys and not operators:
            raise ServeConfigError("the key file defines no key")
        self._users = _digests(keys, "client", "user name")
        self._operators = _digests(operators or {}, "operator", "name")

    def __len__(self) -> int:
        return len(self._users)

    def __repr__(self) -> str:
        return f"ApiKeys({len(self)} keys, {len(self._operators)} operator keys)"

    @property
    def operator_count(self) -> int:
        """How many operator keys the file defines."""
        return len(self._operators)

    @classmethod
    def from_file(cls, path: Path) -> ApiKeys:
        """Read the TOML key file named by ``AIPIPE_API_KEYS``.

        Format: a ``[keys]`` table, each entry ``"<client key>" = "<user>"``, and an optional
        ``[operators]`` table, each entry ``"<operator key>" = "<name>"``; one of them is required.

        Raises:
            ServeConfigError: when the file is missing, not TOML, or has neither a valid ``[keys]``
                nor a valid ``[operators]`` table (the message never quotes a key).
        """
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ServeConfigError(f"AIPIPE_API_KEYS: file not found: {path}") from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise ServeConfigError(f"AIPIPE_API_KEYS: cannot read {path}: {exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ServeConfigError(f"AIPIPE_API_KEYS: {path} is not valid TOML ({exc})") from None
        keys = data.get("keys", {})
        operators = data.get("operators", {})
        if not isinstance(keys, dict) or not isinstance(operators, dict) or not (keys or operators):
            raise ServeConfigError(
                f'AIPIPE_API_KEYS: {path} needs a [keys] table of "<client key>" = "<user>" '
                '(and [operators] of "<operator key>" = "<name>" for the dashboard)'
            )
        try:
            return cls(keys, operators)
        except ServeConfigError as exc:
            raise ServeConfigError(f"AIPIPE_API_KEYS: {path}: {exc}") from None

    def user_for(self, key: str) -> str | None:
        """The user of client key ``key``, or ``None`` when the key is unknown."""
        return _lookup(self._users, key)

    def is_operator(self, name: str) -> bool:
        """Whether ``name`` is still an operator's name in the key file (a session of a removed operator ends)."""
        return name in self._operators.values()

    def operator_for(self, key: str) -> str | None:
        """The operator name of dashboard key ``key``, or ``None`` when it is not an operator key."""
        return _lookup(self._operators, key)


def _lookup(table: Mapping[bytes, str], key: str) -> str | None:
    digest = _digest(key)
    found: str | None = None
    for known, name in table.items():  # every entry compared, in constant time each
        if hmac.compare_digest(known, digest):
            found = name
    return found


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
