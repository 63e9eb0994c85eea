"""Read the original's shell files with bash's meaning, without ever running anything.

The Ruby tool *sourced* ``~/.creds`` (and operators write ``config/<site>.conf`` the same way),
so a line means here what it means to bash, for everything a plain file of settings contains:

* ``export K=V``, ``K=V``, several per line (``export A=1 B=2``), ``K+=V``, ``export K``;
* ``unset K`` (Horizon's openrc has ``unset OS_TENANT_ID``);
* single quotes (everything literal), double quotes (``\\`` escapes only ``$ ` " \\`` and a
  newline), ``$'…'`` (C escapes), backslashes outside quotes, quotes spanning lines,
  ``\\``-newline continuations;
* ``#`` starts a comment only at the start of a word (``s3cr#t`` keeps its ``#``);
* ``$VAR``, ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``, ``${VAR:+alt}``,
  ``${VAR+alt}`` from earlier lines and the environment; ``~`` and ``~user`` at the start of a
  value and after ``:`` in it, as bash expands them in assignments;
* blank lines.

Anything that would run something is refused with the file and line: ``$(…)``, backticks
(outside single quotes), ``;``, ``&``, ``|``, redirections, ``( )``, functions, and any command
(``source``, ``.``, ``if``, ``echo``, …). Bash itself would differ only where it depends on the
machine it runs on, and those are refused too (``$$``, ``$0``, ``~+``, ``\\u`` escapes), or
where bash would fail: a value is never word-split or globbed, as in a plain assignment.
Error messages name the file, the line and the variable, never a value.
"""

from __future__ import annotations

import os
import pwd
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from migratio.errors import ConfigError

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ASSIGNMENT = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(\+?)=")
_BLANK = " \t"
_OPERATORS = {
    ";": "';' (it separates commands)",
    "&": "'&' (it runs commands in the background or chains them)",
    "|": "'|' (a pipe or '||')",
    "<": "'<' (a redirection or process substitution)",
    ">": "'>' (a redirection)",
    "(": "'(' (a subshell, an array or a function definition)",
    ")": "')'",
}
#: words that are not secrets and may be named when a line would run one of them
_COMMANDS = frozenset(
    """source . if then else elif fi case esac for while until do done function select time
    coproc { } [ [[ ! eval exec echo printf read set shopt alias declare typeset local readonly
    cd test true false exit return trap let command builtin enable mapfile readarray""".split()  # noqa: SIM905
)
_C_ESCAPES = {
    "a": "\a",
    "b": "\b",
    "e": "\x1b",
    "E": "\x1b",
    "f": "\f",
    "n": "\n",
    "r": "\r",
    "t": "\t",
    "v": "\v",
    "\\": "\\",
    "'": "'",
    '"': '"',
    "?": "?",
}


@dataclass(frozen=True)
class Lit:
    """Literal text of a word; ``quoted`` when it came from quotes or a backslash."""

    text: str
    quoted: bool


@dataclass(frozen=True)
class Param:
    """``$NAME`` or ``${NAME<op>word}``, expanded when its line runs."""

    name: str
    op: str = ""
    word: tuple[Lit | Param, ...] = ()


Piece = Lit | Param


@dataclass
class ShellFile:
    """What sourcing a file did: the final environment, and what the file itself set."""

    environment: dict[str, str]
    #: keys the file set (and did not unset later), with the line that last set each
    assigned: dict[str, int] = field(default_factory=dict)
    #: keys the file unset
    unset: set[str] = field(default_factory=set)
    #: notes for the operator: a variable used but never set, …
    warnings: list[str] = field(default_factory=list)

    @property
    def values(self) -> dict[str, str]:
        """The keys the file set, with their final values."""
        return {key: self.environment[key] for key in self.assigned}


class _Parser:
    def __init__(self, text: str, source: str, environ: Mapping[str, str]) -> None:
        self.text = text
        self.source = source
        self.pos = 0
        self.line = 1
        self.result = ShellFile(environment=dict(environ))

    # -- errors ------------------------------------------------------------------------

    def error(self, message: str, line: int | None = None) -> ConfigError:
        return ConfigError(f"{self.source}, line {line or self.line}: {message}")

    def refuse(self, what: str, line: int | None = None) -> ConfigError:
        return self.error(
            f"{what} would run something; migratio reads this file, it never runs it: "
            "write the value itself",
            line,
        )

    # -- characters --------------------------------------------------------------------

    def peek(self, offset: int = 0) -> str:
        index = self.pos + offset
        return self.text[index] if index < len(self.text) else ""

    def advance(self, count: int = 1) -> str:
        taken = self.text[self.pos : self.pos + count]
        self.line += taken.count("\n")
        self.pos += count
        return taken

    def skip_blanks(self) -> None:
        while True:
            if self.peek() in (" ", "\t") and self.peek():
                self.advance()
            elif self.peek() == "\\" and self.peek(1) == "\n":
                self.advance(2)
            else:
                return

    # -- the file ----------------------------------------------------------------------

    def parse(self) -> ShellFile:
        if "\0" in self.text:
            raise self.error("the file contains a NUL byte; it is not a text file", 1)
        if "\r" in self.text:
            line = self.text[: self.text.index("\r")].count("\n") + 1
            raise self.error(
                "a carriage return (the file was saved with Windows line ends?); "
                "bash would keep it in the value: convert the file (dos2unix)",
                line,
            )
        while self.pos < len(self.text):
            self.command()
        return self.result

    def command(self) -> None:
        words: list[tuple[int, list[Piece], str]] = []
        start = self.line
        while True:
            self.skip_blanks()
            char = self.peek()
            if not char or char == "\n":
                self.advance()
                break
            if char == "#":
                while self.peek() and self.peek() != "\n":
                    self.advance()
                continue
            if char in _OPERATORS:
                command = _plain(words[0][1]) if words else None
                if command in _COMMANDS:  # `if [ … ]; then`: the command says more than ';'
                    raise self.refuse(f"'{command}'", start)
                raise self.refuse(_OPERATORS[char])
            line = self.line
            begin = self.pos
            pieces = self.word()
            words.append((line, pieces, self.text[begin : self.pos]))
        if words:
            self.run(words, start)

    # -- words -------------------------------------------------------------------------

    def word(self) -> list[Piece]:  # noqa: PLR0912 (one branch per kind of character)
        """One word, up to an unquoted blank, newline or operator."""
        pieces: list[Piece] = []
        literal: list[str] = []

        def flush() -> None:
            if literal:
                pieces.append(Lit("".join(literal), quoted=False))
                literal.clear()

        while True:
            char = self.peek()
            if not char or char in _BLANK or char == "\n" or char in _OPERATORS:
                break
            if char == "'":
                flush()
                pieces.append(self.single_quoted())
            elif char == '"':
                flush()
                pieces.extend(self.double_quoted())
            elif char == "\\":
                if self.peek(1) == "\n":
                    self.advance(2)
                elif self.peek(1):
                    flush()
                    self.advance()
                    pieces.append(Lit(self.advance(), quoted=True))
                else:
                    literal.append(self.advance())
            elif char == "`":
                raise self.refuse("a backtick (command substitution)")
            elif char == "$":
                if self.peek(1) == "'":
                    flush()
                    pieces.append(self.ansi_c_quoted())
                elif self.peek(1) == '"':
                    raise self.error('$"…" (a translated string) is not supported: use "…"')
                else:
                    expansion = self.dollar()
                    if isinstance(expansion, Lit):
                        literal.append(expansion.text)
                    else:
                        flush()
                        pieces.append(expansion)
            else:
                literal.append(self.advance())
        flush()
        return pieces

    def single_quoted(self) -> Lit:
        line = self.line
        self.advance()
        end = self.text.find("'", self.pos)
        if end < 0:
            raise self.error("a single quote is never closed", line)
        text = self.advance(end - self.pos)
        self.advance()
        return Lit(text, quoted=True)

    def double_quoted(self) -> list[Piece]:
        line = self.line
        self.advance()
        pieces: list[Piece] = [Lit("", quoted=True)]  # "" is an empty word, not no word
        text: list[str] = []
        while True:
            char = self.peek()
            if not char:
                raise self.error("a double quote is never closed", line)
            if char == '"':
                self.advance()
                break
            if char == "\\":
                following = self.peek(1)
                if following == "\n":
                    self.advance(2)
                elif following in ('"', "\\", "$", "`"):
                    self.advance()
                    text.append(self.advance())
                else:
                    text.append(self.advance())
            elif char == "`":
                raise self.refuse("a backtick (command substitution)")
            elif char == "$":
                expansion = self.dollar(quoted=True)
                if isinstance(expansion, Lit):
                    text.append(expansion.text)
                else:
                    pieces.append(Lit("".join(text), quoted=True))
                    text.clear()
                    pieces.append(expansion)
            else:
                text.append(self.advance())
        pieces.append(Lit("".join(text), quoted=True))
        return [p for p in pieces if not isinstance(p, Lit) or p.text] or [Lit("", quoted=True)]

    def ansi_c_quoted(self) -> Lit:
        line = self.line
        self.advance(2)
        out: list[str] = []
        while True:
            char = self.peek()
            if not char:
                raise self.error("a $'…' quote is never closed", line)
            self.advance()
            if char == "'":
                return Lit("".join(out), quoted=True)
            if char != "\\":
                out.append(char)
                continue
            code = self.advance()
            if code in _C_ESCAPES:
                out.append(_C_ESCAPES[code])
            elif code in "01234567":
                digits = code
                while len(digits) < 3 and self.peek() and self.peek() in "01234567":
                    digits += self.advance()
                out.append(chr(int(digits, 8) & 0xFF))
            elif code == "x" and re.match(r"[0-9A-Fa-f]", self.peek()):
                digits = self.advance()
                if re.match(r"[0-9A-Fa-f]", self.peek()):
                    digits += self.advance()
                out.append(chr(int(digits, 16)))
            elif code in ("u", "U", "c"):
                raise self.error(
                    f"\\{code} in $'…' depends on bash's locale; write the character itself"
                )
            else:
                out.append("\\" + code)

    def dollar(self, *, quoted: bool = False) -> Piece:
        """What follows a ``$``: a parameter, or a plain ``$``; refuses substitutions."""
        following = self.peek(1)
        if following == "(":
            what = "$((…)) (arithmetic)" if self.peek(2) == "(" else "$(…) (command substitution)"
            raise self.refuse(what)
        if following == "[":
            raise self.refuse("$[…] (arithmetic)")
        if following == "{":
            return self.braced(quoted=quoted)
        match = _NAME.match(self.text, self.pos + 1)
        if match:
            self.advance(1 + len(match.group()))
            return Param(match.group())
        if following and following in "0123456789$?#@*-!":
            raise self.error(
                f"${following} is one of bash's special parameters, which depend on how bash "
                "runs; write the value itself"
            )
        self.advance()
        return Lit("$", quoted=quoted)

    def braced(self, *, quoted: bool) -> Param:  # noqa: PLR0912
        line = self.line
        self.advance(2)
        match = _NAME.match(self.text, self.pos)
        if not match:
            raise self.error(
                "${…} must name a variable (${NAME}, ${NAME:-default}); other expansions "
                "are not supported",
                line,
            )
        name = match.group()
        self.advance(len(name))
        if self.peek() == "}":
            self.advance()
            return Param(name)
        op = ""
        for candidate in (":-", ":+", "-", "+"):
            if self.text.startswith(candidate, self.pos):
                op = candidate
                break
        if not op:
            raise self.error(
                f"${{{name}…}}: only ${{{name}}}, ${{{name}:-default}}, ${{{name}-default}}, "
                f"${{{name}:+alt}} and ${{{name}+alt}} are supported",
                line,
            )
        self.advance(len(op))
        word: list[Piece] = []
        text: list[str] = []
        while True:
            char = self.peek()
            if not char:
                raise self.error(f"${{{name}{op}…}} is never closed", line)
            if char == "}":
                self.advance()
                break
            if char in "'\"\\`\n~" or (char == "$" and self.peek(1) in "('\"["):
                raise self.error(
                    f"the default in ${{{name}{op}…}} may hold only plain text and $NAME; "
                    "write the value itself",
                    line,
                )
            if char == "$":
                inner = self.dollar(quoted=True)
                if isinstance(inner, Param):
                    if text:
                        word.append(Lit("".join(text), quoted=quoted))
                        text.clear()
                    word.append(inner)
                    continue
                text.append(inner.text)
                continue
            text.append(self.advance())
        if text:
            word.append(Lit("".join(text), quoted=quoted))
        return Param(name, op, tuple(word))

    # -- running a line (without running anything) ---------------------------------------

    def run(self, words: list[tuple[int, list[Piece], str]], line: int) -> None:
        first = words[0][1]
        name = _plain(first)
        if name == "export":
            self.export(words[1:], line)
        elif name == "unset":
            self.unset(words[1:], line)
        elif all(_assignment(pieces) for _, pieces, _ in words):
            for word_line, pieces, _ in words:
                self.assign(pieces, word_line)
        elif _assignment(first):
            key = _assignment(first)
            raise self.refuse(
                f"after {key}=… comes another word, which bash would run as a command "
                f"(quote the value if it holds a blank); this line",
                line,
            )
        elif name in _COMMANDS:
            raise self.refuse(f"'{name}'", line)
        else:
            raise self.refuse(
                "a command (a line that is not 'export K=V', 'K=V' or 'unset K')", line
            )

    def export(self, words: list[tuple[int, list[Piece], str]], line: int) -> None:
        # bash expands every argument before export runs: `export A= B=$A` sees the old A
        values: list[tuple[str, bool, str, int]] = []
        for word_line, pieces, raw in words:
            key = _assignment(pieces)
            if key:
                if _has_brace_expansion(pieces):
                    raise self.error(
                        f"the value of {key} has an unquoted {{…,…}}, which bash expands into "
                        "several words; quote it",
                        word_line,
                    )
                values.append((*self.evaluate(pieces, word_line), word_line))
                continue
            plain = _plain(pieces)
            if plain is not None and plain.startswith("-"):
                raise self.error(f"export {plain} is not supported (only export K=V)", word_line)
            if plain is None or not _NAME.fullmatch(plain):
                raise self.error(
                    "export takes NAME=VALUE or NAME; this is not a variable name"
                    + (f" ({raw})" if plain is not None and "=" not in raw else ""),
                    word_line,
                )
            # export NAME: already exported here (bash: set -a); nothing changes
        for key, append, value, word_line in values:
            self.store(key, append, value, word_line)

    def unset(self, words: list[tuple[int, list[Piece], str]], line: int) -> None:
        for word_line, pieces, _ in words:
            plain = _plain(pieces)
            if plain == "-v":
                continue
            if plain is None or not _NAME.fullmatch(plain):
                raise self.error(
                    "unset takes variable names (unset -f, unset -n and expansions are not "
                    "supported)",
                    word_line,
                )
            self.result.environment.pop(plain, None)
            self.result.assigned.pop(plain, None)
            self.result.unset.add(plain)

    def assign(self, pieces: list[Piece], line: int) -> None:
        self.store(*self.evaluate(pieces, line), line)

    def evaluate(self, pieces: list[Piece], line: int) -> tuple[str, bool, str]:
        """An assignment word's variable, whether it appends (``+=``), and its value."""
        head = pieces[0]
        assert isinstance(head, Lit)
        match = _ASSIGNMENT.match(head.text)
        assert match is not None
        key, append = match.group(1), match.group(2) == "+"
        rest = head.text[match.end() :]
        value_pieces: list[Piece] = [Lit(rest, quoted=False)] if rest else []
        value_pieces += pieces[1:]
        try:
            value_pieces = _tilde(value_pieces, self.home)
        except ValueError as exc:
            raise self.error(
                f"the value of {key}: {exc}; write the directory itself", line
            ) from None
        return key, append, self.expand(value_pieces, line, key)

    def store(self, key: str, append: bool, value: str, line: int) -> None:
        env = self.result.environment
        env[key] = env.get(key, "") + value if append else value
        self.result.assigned.pop(key, None)
        self.result.assigned[key] = line
        self.result.unset.discard(key)

    def home(self, user: str) -> str | None:
        if not user:
            home = self.result.environment.get("HOME")
            return home if home is not None else pwd.getpwuid(os.getuid()).pw_dir
        try:
            return pwd.getpwnam(user).pw_dir
        except KeyError:
            return None

    def expand(self, pieces: list[Piece] | tuple[Piece, ...], line: int, key: str) -> str:
        out: list[str] = []
        env = self.result.environment
        for piece in pieces:
            if isinstance(piece, Lit):
                out.append(piece.text)
                continue
            value = env.get(piece.name)
            if piece.op in (":-", "-"):
                use_default = value is None or (piece.op == ":-" and not value)
                out.append(self.expand(piece.word, line, key) if use_default else value or "")
            elif piece.op in (":+", "+"):
                use_alt = value is not None and (piece.op == "+" or bool(value))
                out.append(self.expand(piece.word, line, key) if use_alt else "")
            else:
                if value is None:
                    self.result.warnings.append(
                        f"{self.source}, line {line}: {key} uses ${piece.name}, which is not "
                        "set (bash makes it empty)"
                    )
                out.append(value or "")
        return "".join(out)


def _plain(pieces: list[Piece]) -> str | None:
    """The word's text when it holds no expansion (quotes removed), else None."""
    if any(isinstance(p, Param) for p in pieces):
        return None
    return "".join(p.text for p in pieces if isinstance(p, Lit))


def _assignment(pieces: list[Piece]) -> str | None:
    """The variable name when the word is ``NAME=…`` or ``NAME+=…`` (the name unquoted)."""
    head = pieces[0] if pieces else None
    if isinstance(head, Lit) and not head.quoted:
        match = _ASSIGNMENT.match(head.text)
        if match:
            return match.group(1)
    return None


def _has_brace_expansion(pieces: list[Piece]) -> bool:
    text = "".join(p.text if isinstance(p, Lit) and not p.quoted else "\0" for p in pieces)
    return bool(re.search(r"\{[^{}\0]*(,|\.\.)[^{}\0]*\}", text))


def _tilde(pieces: list[Piece], home: Callable[[str], str | None]) -> list[Piece]:
    """Bash's tilde expansion in an assignment: at the start and after each unquoted ':'."""
    out: list[Piece] = []
    at_start = True  # at the start of the value, or right after an unquoted ':'
    for index, piece in enumerate(pieces):
        if not isinstance(piece, Lit) or piece.quoted:
            out.append(piece)
            at_start = False
            continue
        parts = piece.text.split(":")
        rebuilt: list[str] = []
        for number, part in enumerate(parts):
            starts = at_start if number == 0 else True
            last = number == len(parts) - 1
            expanded = part
            if starts and part.startswith("~"):
                prefix, slash, tail = part[1:].partition("/")
                # the prefix must be all unquoted: it may not run on into the next piece
                ends_here = bool(slash) or not last or index == len(pieces) - 1
                if ends_here and prefix in ("+", "-"):
                    raise ValueError(f"~{prefix} depends on the directory bash runs in")
                if ends_here and re.fullmatch(r"([A-Za-z0-9_.][A-Za-z0-9_.-]*)?", prefix):
                    directory = home(prefix)
                    if directory is not None:
                        expanded = directory + slash + tail
            rebuilt.append(expanded)
        out.append(Lit(":".join(rebuilt), quoted=True))  # expanded: no second expansion
        at_start = False
    return out


def parse_shell_file(
    text: str, *, source: str = "<text>", environ: Mapping[str, str] | None = None
) -> ShellFile:
    """What sourcing ``text`` with bash (``set -a; . FILE``) would do, without running it.

    ``environ`` (default: this process's environment) is what ``$VAR`` sees before the file
    sets it.
    """
    return _Parser(text, source, os.environ if environ is None else environ).parse()


def parse_shell_vars(
    text: str, *, source: str = "<text>", environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The variables ``text`` sets (and does not unset), with bash's values."""
    return parse_shell_file(text, source=source, environ=environ).values


def read_shell_file(path: Path, environ: Mapping[str, str] | None = None) -> ShellFile:
    """Read and parse one file, naming it in every error."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: file not found") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    return parse_shell_file(text, source=str(path), environ=environ)


def read_shell_vars(path: Path, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The variables one file sets (see :func:`read_shell_file`)."""
    return read_shell_file(path, environ).values
