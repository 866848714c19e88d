"""API keys: each key belongs to one tenant, or is an admin key.

The file is JSON mapping key -> tenant name, or key -> {"tenant": name, "admin": true}:
    {"sk-acme-1": "acme", "sk-globex": "globex", "sk-ops": {"tenant": "ops", "admin": true}}
A tenant sees, uses, replaces and deletes only its own adapters; an admin also reaches
another tenant's adapter as "tenant/adapter_id". Without a file the server has one tenant,
"default", and must listen on loopback only.
"""

from __future__ import annotations

import hmac
import json
from dataclasses import dataclass
from pathlib import Path

from adapters.base import AdapterError
from server.store import check_id

DEFAULT_TENANT = "default"


@dataclass(frozen=True)
class Principal:
    tenant: str
    admin: bool = False


class Auth:
    def __init__(self, keys: dict[str, Principal] | None):
        self.keys = keys

    @property
    def enabled(self) -> bool:
        return self.keys is not None

    @classmethod
    def from_file(cls, path: str | None) -> "Auth":
        if path is None:
            return cls(None)
        try:
            raw = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise AdapterError(f"api keys file {path} does not exist") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise AdapterError(f"api keys file {path} is not valid JSON: {e}") from None
        if not isinstance(raw, dict) or not raw:
            raise AdapterError(f"api keys file {path} must be a non-empty JSON object of key -> tenant")
        keys = {}
        for k, v in raw.items():
            if isinstance(v, str):
                keys[k] = Principal(check_id("tenant", v))
            elif isinstance(v, dict) and isinstance(v.get("tenant", "admin"), str):
                keys[k] = Principal(check_id("tenant", v.get("tenant", "admin")), bool(v.get("admin", False)))
            else:
                raise AdapterError(f"api keys file {path}: the value for a key must be a tenant name or an object")
        return cls(keys)

    def principal(self, authorization: str | None) -> Principal | None:
        """The caller for an Authorization header; None when the key is missing or unknown."""
        if self.keys is None:
            return Principal(DEFAULT_TENANT, admin=True)
        if not authorization or not authorization.lower().startswith("bearer "):
            return None
        given = authorization[7:].strip()
        for k, p in self.keys.items():
            if hmac.compare_digest(k.encode(), given.encode()):
                return p
        return None
