"""Secrets from the environment: the variable NAME, or the file that NAME_FILE names.

The file form is Docker's and Kubernetes' way of handing a secret to one container without putting it
in its environment (`docker inspect` shows environments; /run/secrets/<name> is a tmpfs mount), and the
`*_FILE` convention is the one the official images use (POSTGRES_PASSWORD_FILE, ...). Only one form
may be set: two disagreeing sources would make the one in use a guess.
"""

from __future__ import annotations

import os
from pathlib import Path

from pso.config.loader import ConfigError

MAX_SECRET_BYTES = 64 * 1024  # a token or a password; anything larger is a wrong path, not a secret


def read_secret(name: str) -> str | None:
    """$NAME, or the contents of the file $NAME_FILE (a final newline dropped); None when neither is set.

    Raises ConfigError (`pso` exits 2: retrying cannot help), naming the variables (never a value), when both
    are set or the file is unreadable, too large or not text."""
    value, path = os.environ.get(name), os.environ.get(f"{name}_FILE")
    if not path:
        return value
    if value:
        raise ConfigError(f"both ${name} and ${name}_FILE are set: keep one")
    file = Path(path)
    try:
        if file.stat().st_size > MAX_SECRET_BYTES:
            raise ConfigError(f"${name}_FILE names {path}, larger than {MAX_SECRET_BYTES} bytes: not a secret file")
        return file.read_text(encoding="utf-8").rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"${name}_FILE names {path}, which cannot be read: {type(e).__name__}") from None
