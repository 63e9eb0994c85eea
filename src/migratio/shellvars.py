"""Read the original's shell-style credential and site files without executing them.

The Ruby tool's ``~/.creds`` and ``config/<site>.conf`` are lines of ``export KEY=VALUE``.
They are *parsed* here — quotes, comments and blank lines as a POSIX shell reads them — and
nothing in them is ever run: ``$(...)``, backticks and ``$VAR`` stay literal text.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from migratio.errors import ConfigError

_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def parse_shell_vars(text: str, *, source: str = "<text>") -> dict[str, str]:
    """Parse ``[export] KEY=VALUE`` lines; later lines override earlier ones."""
    values: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{source}, line {number}"
        if "$(" in line or "`" in line:
            raise ConfigError(
                f"{where}: command substitution is not supported: migratio reads this file, "
                "it never runs it; write the value itself"
            )
        try:
            words = shlex.split(line, comments=True, posix=True)
        except ValueError as exc:  # unbalanced quotes
            raise ConfigError(f"{where}: cannot parse {raw.strip()!r}: {exc}") from exc
        if not words:
            continue
        if words[0] == "export":
            words = words[1:]
        if len(words) != 1 or "=" not in words[0]:
            raise ConfigError(f"{where}: expected 'export KEY=VALUE', found {raw.strip()!r}")
        key, value = words[0].split("=", 1)
        if not _KEY.fullmatch(key):
            raise ConfigError(f"{where}: {key!r} is not a valid variable name")
        values[key] = value
    return values


def read_shell_vars(path: Path) -> dict[str, str]:
    """Read and parse one ``export KEY=VALUE`` file, naming it in every error."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: file not found") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from exc
    return parse_shell_vars(text, source=str(path))
