"""Refuse transaction control, and session state, in statements a client sends (/api/v1/exec, /api/v1/query).

The peer runs a client's statements inside the one database transaction of a global transaction. A `COMMIT`,
`ROLLBACK`, `BEGIN`, `SAVEPOINT`/`RELEASE` or `PREPARE TRANSACTION` among them would end (or split) that transaction
behind the commit protocol's back: a COMMIT followed by a failing statement left the rows before it committed at the
origin only, though the request was refused; a PREPARE TRANSACTION left a prepared transaction holding locks. Such
statements are found here, at the start of every top-level statement (outside quotes, dollar quotes and comments),
and refused before anything runs. (COMMIT inside a DO block or procedure is refused by PostgreSQL itself inside a
transaction block.)

Session state is refused too (`session_state`): the peer serves every request on a pooled connection, so a plain
`SET` (or `SET SESSION`), `RESET`, `DISCARD`, `PREPARE <name>`, `DEALLOCATE`, `LISTEN`, `UNLISTEN` or `LOAD` would
outlive the request and change what later requests of any client, and the peer's own work, run with (a `SET`
persists even after PREPARE TRANSACTION; a `DEALLOCATE` would take away psycopg's prepared statements). `SET LOCAL`,
`SET TRANSACTION` and `SET CONSTRAINTS` end with the transaction and are allowed. (`set_config(…, false)` inside a
query is not found here.)
"""

from __future__ import annotations

import re
from collections.abc import Iterator

TRANSACTION_CONTROL = frozenset({"BEGIN", "START", "COMMIT", "END", "ROLLBACK", "ABORT", "SAVEPOINT", "RELEASE"})
SESSION_STATE = frozenset({"RESET", "DISCARD", "DEALLOCATE", "LISTEN", "UNLISTEN", "LOAD"})
TRANSACTION_SCOPED_SET = frozenset({"LOCAL", "TRANSACTION", "CONSTRAINTS"})
_DOLLAR_TAG = re.compile(r"\$(?:[A-Za-z_][A-Za-z0-9_]*)?\$")
_WORD = re.compile(r"[^\W\d]\w*")  # a letter or _ (any script), then letters, digits, _


def _skip_comment(text: str, i: int) -> int:
    """The index after the comment starting at i (`--` to the end of the line, or nested `/* */`)."""
    if text.startswith("--", i):
        end = text.find("\n", i)
        return len(text) if end < 0 else end + 1
    depth, i = 1, i + 2
    while i < len(text) and depth:
        if text.startswith("/*", i):
            depth, i = depth + 1, i + 2
        elif text.startswith("*/", i):
            depth, i = depth - 1, i + 2
        else:
            i += 1
    return i


def _skip_quoted(text: str, i: int) -> int:
    """The index after the quoted string, identifier or dollar-quoted body starting at i."""
    quote = text[i]
    if quote == "$":
        match = _DOLLAR_TAG.match(text, i)
        assert match is not None
        end = text.find(match.group(), match.end())
        return len(text) if end < 0 else end + len(match.group())
    backslash = quote == "'" and i > 0 and text[i - 1] in "eE"
    i += 1
    while i < len(text):
        if backslash and text[i] == "\\":
            i += 2
        elif text[i] == quote:
            if text.startswith(quote * 2, i):
                i += 2
            else:
                return i + 1
        else:
            i += 1
    return i


def statement_heads(text: str) -> list[str]:
    """The first two words (upper case) of every top-level statement in `text`, quotes and comments skipped."""
    heads: list[str] = []
    words: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if text.startswith(("--", "/*"), i):
            i = _skip_comment(text, i)
        elif ch in "'\"" or (ch == "$" and _DOLLAR_TAG.match(text, i) and not (i and text[i - 1].isalnum())):
            words.append("")  # a quoted token: no keyword
            i = _skip_quoted(text, i)
        elif ch == ";":
            if words:
                heads.append(" ".join(words[:2]))
            words, i = [], i + 1
        elif _WORD.match(text, i):
            match = _WORD.match(text, i)
            assert match is not None
            words.append(match.group().upper())
            i = match.end()
        else:
            if not ch.isspace():
                words.append("")
            i += 1
    if words:
        heads.append(" ".join(words[:2]))
    return heads


def _commands(statements: list[str]) -> Iterator[tuple[str, str, str]]:
    """(first word, second word, both) of every top-level statement among `statements`."""
    for statement in statements:
        for head in statement_heads(statement):
            first, _, second = head.partition(" ")
            yield first, second, head


def transaction_control(statements: list[str]) -> str | None:
    """The first transaction-control command (COMMIT, PREPARE TRANSACTION, …) among `statements`, or None."""
    for first, second, head in _commands(statements):
        if first in TRANSACTION_CONTROL:
            return first
        if first == "PREPARE" and second == "TRANSACTION":
            return head
    return None


def session_state(statements: list[str]) -> str | None:
    """The first command among `statements` that would leave state on the session (plain SET, RESET, PREPARE <name>,
    …: see the module), named as the error names it (`SET SEARCH_PATH`, `RESET`), or None."""
    for first, second, head in _commands(statements):
        if first in SESSION_STATE:
            return first
        if first == "SET" and second not in TRANSACTION_SCOPED_SET:
            return head
        if first == "PREPARE" and second != "TRANSACTION":
            return first
    return None
