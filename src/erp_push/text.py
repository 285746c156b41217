"""Text from outside (servers, invoices, remote folders) made safe to show on a terminal.

A server's error message or reason phrase, a remote file name or an invoice number may
hold control characters: ESC starts a terminal escape sequence (erase the line, set the
window title, ...), CR returns to the start of the line so that what follows overwrites
what the operator should have read. Everything erp-push prints for people passes through
``printable``: C0 and C1 control characters, DEL and the bidi embedding, override and
isolate characters (which reorder what follows them) are shown as escapes (``\\x1b``,
``\\r``, ``\\u202e``). The rest of Unicode is left alone: accented names stay readable.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from urllib.parse import quote

_NAMED = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}
_NOT_C0 = "\x7f-\x9f\u202a-\u202e\u2066-\u2069"  # DEL, C1, bidi embeddings/overrides/isolates
_UNPRINTABLE = re.compile(f"[\x00-\x1f{_NOT_C0}]")
# json.dumps escapes C0 itself; the line breaks of an indented document must stay.
_UNPRINTABLE_IN_JSON = re.compile(f"[{_NOT_C0}]")
ELLIPSIS = "…"
REDACTED = "***"


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    if char in _NAMED:
        return _NAMED[char]
    code = ord(char)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def printable(text: str) -> str:
    """``text`` with every control character shown as an escape; one line stays one line."""
    return _UNPRINTABLE.sub(_escape, text)


def printable_lines(text: str) -> str:
    """``printable`` for text whose line breaks are erp-push's own (a list of settings
    problems, a traceback): each line is escaped, the line feeds between them stay."""
    return "\n".join(printable(line) for line in text.split("\n"))


def json_safe(document: str) -> str:
    """A document from ``json.dumps(..., ensure_ascii=False)`` with DEL, C1 and bidi
    control characters written as ``\\u`` escapes, as ``json.dumps`` already does for C0.

    Outside strings JSON holds only ASCII punctuation, digits and letters, so these
    characters can only be inside strings, where ``\\u00XX`` means the same character.
    """
    return _UNPRINTABLE_IN_JSON.sub(lambda m: f"\\u{ord(m.group()):04x}", document)


def shorten(text: str, limit: int, *, measure: Callable[[str], int] = len) -> str:
    """``text`` cut to at most ``limit`` (as ``measure`` counts), ending in "…" if cut.

    Cuts between code points, so never inside a surrogate pair; ``measure`` lets a caller
    count as its reader does (``wire.text_length``: UTF-16 units, as Nuntiq counts).
    """
    if measure(text) <= limit:
        return text
    budget = limit - measure(ELLIPSIS)
    kept: list[str] = []
    for char in text:
        budget -= measure(char)
        if budget < 0:
            break
        kept.append(char)
    return "".join(kept) + ELLIPSIS


def redact(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every secret cut out, as is and in the escaped forms a repr, a bytes
    repr or a URL gives it: a server or library echoing a key must not spread it."""
    for secret in secrets:
        for form in {
            secret,
            repr(secret)[1:-1],
            repr(secret.encode())[2:-1],
            quote(secret, safe=""),
        }:
            if form:
                text = text.replace(form, REDACTED)
    return text
