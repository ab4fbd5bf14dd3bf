"""Settings read from the environment and from flags that stand in for it, normalised once, here.

Every check that compares such a setting with another value compares the normal forms these functions return:

- ``env_setting``: a variable's value with surrounding whitespace removed; unset and blank are both None; a value
  that is not text (bytes that are not UTF-8) stops naming the variable;
- ``api_key_setting``: ``--api_key``, else ``$OPENLLM_API_KEY``, stripped as the bearer token it is compared with
  is stripped; an empty key is refused (never silently no authentication), and so is one HTTP cannot carry;
- ``ray_address``: ``--address``, else ``$RAY_ADDRESS``; None (start a private local instance) when unset,
  blank or ``local`` in any case; ``auto`` in lower case; anything else as written, stripped;
- ``host_setting`` / ``is_loopback``: ``--host`` without brackets or surrounding space, and whether it is this
  machine only (any 127.x address, ``::1``, ``localhost`` in any case).

Path settings have their normal form in ``openllm_ds.paths``.
"""

from __future__ import annotations

import ipaddress
import os

from openllm_ds.errors import UserError
from openllm_ds.text import check_text

TRUE_WORDS = ("1", "true", "yes", "on")


def env_setting(name: str) -> str | None:
    """``$name`` stripped; None when unset or blank."""
    value = os.environ.get(name)
    if value is None:
        return None
    value = check_text(value, f"environment variable {name}").strip()
    return value or None


def env_flag(name: str) -> bool:
    """``$name`` is one of 1, true, yes, on (any case, surrounding space ignored)."""
    return (env_setting(name) or "").lower() in TRUE_WORDS


def env_int(name: str, default: int) -> int:
    value = env_setting(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise UserError(f"environment variable {name}={value!r} is not an integer; unset it or set a number") from None


def api_key_setting(flag_value: str | None) -> str | None:
    """The server's API key: ``--api_key``, else ``$OPENLLM_API_KEY`` (normal_api_key); None: no authentication."""
    if flag_value is not None:
        return normal_api_key(flag_value, "--api_key")
    if "OPENLLM_API_KEY" in os.environ:
        return normal_api_key(os.environ["OPENLLM_API_KEY"], "OPENLLM_API_KEY")
    return None


def normal_api_key(value: str, name: str = "api_key") -> str:
    """An API key as the server compares it with a bearer token: stripped (as the token is); an empty one, or one an
    HTTP header cannot carry, is refused."""
    key = check_text(value, name).strip()
    if not key:
        raise UserError(f"{name} is empty: pass a key (--api_key or OPENLLM_API_KEY), or leave both unset to serve "
                        "without authentication")
    if not all(" " < c <= "~" for c in key):  # an Authorization header carries printable ASCII without spaces
        raise UserError(f"{name} holds characters an HTTP Authorization header cannot carry (spaces, control or "
                        "non-ASCII characters); use printable ASCII, e.g. python -c 'import secrets; "
                        "print(secrets.token_hex(32))'")
    return key


def ray_address(flag_value: str | None = None) -> str | None:
    """The Ray cluster to join: ``--address``, else ``$RAY_ADDRESS``; None: a private local instance."""
    value = check_text(flag_value, "--address").strip() if flag_value is not None else env_setting("RAY_ADDRESS")
    if not value or value.lower() == "local":
        return None
    return "auto" if value.lower() == "auto" else value


def host_setting(host: str) -> str:
    """``--host`` as the socket layer takes it: no surrounding space, no brackets around an IPv6 address."""
    host = check_text(host, "--host").strip()
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def is_loopback(host: str) -> bool:
    """Whether ``host`` (normalised by host_setting) listens on this machine only."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
