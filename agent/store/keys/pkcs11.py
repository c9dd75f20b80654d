"""Master keys in a PKCS#11 token (``[store.keys] wrapper = "pkcs11"``): an HSM, a
cloud HSM or SoftHSM2, through the interface they all speak (python-pkcs11).

Each master key is an AES-256 secret key generated in the token, sensitive and not
extractable, labelled ``callrec-master:<key id>``. A recording's data key is wrapped
inside the token with AES-GCM (C_Encrypt, a random 96-bit nonce, the same associated
data as the file wrapper), so the master key never leaves the token: a copy of the
store host's disk or of its backups holds no master key (SoftHSM2's own token files
are encrypted under the user PIN, which lives in ``pkcs11_pin_file``; a hardware
token keeps the key in hardware). The current key is the newest (its CKA_ID holds
its creation time); older keys in the token still unwrap until retired.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import pkcs11
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.exceptions import PKCS11Error, UserAlreadyLoggedIn
from pkcs11.mechanisms import GCMParams

from agent.config import KeysConfig
from agent.privacy import KeyFileError, check_private_file
from agent.store.keys.master import KeyWrapError, new_key_id, wrap_aad

LABEL_PREFIX = "callrec-master:"
_NONCE_BYTES = 12


class Pkcs11KeyWrapper:
    """A KeyWrapper over one logged-in session of a token; thread-safe (one
    operation at a time on the session, as PKCS#11 requires)."""

    def __init__(self, session: Any, token_label: str) -> None:
        self._session = session
        self._lock = threading.Lock()
        self.token_label = token_label
        self._keys: dict[str, Any] = {}
        self._reload()

    @classmethod
    def open(cls, config: KeysConfig) -> Pkcs11KeyWrapper:
        if config.pkcs11_module is None or config.pkcs11_pin_file is None:
            raise KeyFileError("[store.keys] pkcs11_module and pkcs11_pin_file are required")
        check_private_file(config.pkcs11_pin_file)
        pin = config.pkcs11_pin_file.read_text().strip()
        try:
            library = pkcs11.lib(str(config.pkcs11_module))
            token = library.get_token(token_label=config.pkcs11_token_label)
            try:
                session = token.open(user_pin=pin, rw=True)
            except UserAlreadyLoggedIn:  # login is per process: another session of ours
                session = token.open(rw=True)
        except (PKCS11Error, RuntimeError) as exc:
            raise KeyFileError(
                f"PKCS#11 token {config.pkcs11_token_label!r} ({config.pkcs11_module}): cannot log "
                f"in: {type(exc).__name__} {exc}"
            ) from None
        return cls(session, config.pkcs11_token_label)

    def _reload(self) -> None:
        found = self._session.get_objects(
            {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.AES}
        )
        self._keys = {
            str(k.label).removeprefix(LABEL_PREFIX): k
            for k in found
            if str(k.label).startswith(LABEL_PREFIX)
        }
        # CKA_ID holds the creation time (ns): the newest key is current.
        self._order = {key_id: _created(k) for key_id, k in self._keys.items()}

    @property
    def source(self) -> str:
        return "pkcs11"

    @property
    def current_key_id(self) -> str:
        if not self._keys:
            raise KeyFileError(f"PKCS#11 token {self.token_label!r} holds no callrec master key")
        return max(self._keys, key=lambda key_id: (self._order[key_id], key_id))

    def key_ids(self) -> frozenset[str]:
        return frozenset(self._keys)

    def key(self, key_id: str) -> Any:
        """The token's key object (its attributes, never its value)."""
        return self._keys[key_id]

    def wrap(self, data_key: bytes, context: bytes, key_id: str | None = None) -> tuple[str, bytes]:
        key_id = key_id or self.current_key_id
        nonce = os.urandom(_NONCE_BYTES)
        param = GCMParams(nonce, wrap_aad(key_id, context), 128)
        with self._lock:
            sealed = self._keys[key_id].encrypt(
                data_key, mechanism=Mechanism.AES_GCM, mechanism_param=param
            )
        return key_id, nonce + bytes(sealed)

    def unwrap(self, key_id: str, wrapped: bytes, context: bytes) -> bytes:
        key = self._keys.get(key_id)
        if key is None:
            raise KeyWrapError(f"master key {key_id!r} is not in token {self.token_label!r}")
        param = GCMParams(wrapped[:_NONCE_BYTES], wrap_aad(key_id, context), 128)
        try:
            with self._lock:
                plain = key.decrypt(
                    wrapped[_NONCE_BYTES:], mechanism=Mechanism.AES_GCM, mechanism_param=param
                )
        except PKCS11Error:
            raise KeyWrapError(f"wrapped key does not open under {key_id!r}") from None
        return bytes(plain)

    def generate(self, key_id: str | None = None) -> str:
        """A new master key made in the token (never extractable); it is current."""
        key_id = key_id or new_key_id()
        template = {
            Attribute.ID: time.time_ns().to_bytes(8, "big"),
            Attribute.TOKEN: True,
            Attribute.PRIVATE: True,
            Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: False,
            Attribute.ENCRYPT: True,
            Attribute.DECRYPT: True,
        }
        with self._lock:
            self._session.generate_key(
                KeyType.AES, 256, label=LABEL_PREFIX + key_id, store=True, template=template
            )
            self._reload()
        return key_id

    def destroy(self, key_id: str) -> None:
        with self._lock:
            self._keys[key_id].destroy()
            self._reload()

    def close(self) -> None:
        self._session.close()


def _created(key: Any) -> bytes:
    """The key's CKA_ID (its creation time as written by ``generate``; empty if none)."""
    try:
        return bytes(key[Attribute.ID])
    except (PKCS11Error, KeyError):
        return b""
