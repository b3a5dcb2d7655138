"""Text from inputs made safe to show: in Markdown/HTML reports (``markdown_text``) and on a terminal
(``visible_text``). Every string a user, a reader or a downloaded file supplied goes through one of them.

``visible_text`` keeps printable characters and writes every other one as a visible ``\\u....`` escape:
control characters (NUL, ESC and the terminal sequences it starts), format characters (zero-width
spaces and joiners, soft hyphens, bidi overrides such as U+202E), surrogates, private-use and
unassigned code points, and letters that render as blank (U+3164 and its kin). Runs of whitespace
become one space. Nothing is dropped silently: what was there stays readable.

``markdown_text`` is ``visible_text`` then escaped for Markdown and the HTML it may contain: ``&``, ``<``,
``>``, ``"`` and ``'`` as entities, and the ASCII punctuation Markdown gives a meaning (links, images,
emphasis, code spans, strikethrough, table cells, headings, bullet and numbered lists) behind a backslash,
but for ``_`` inside a word, which CommonMark never reads as emphasis. The result is
plain text in any position of a line or a table cell: no tag, comment, link, image or autolink can start
(``@``, ``://`` and a dot inside a name, which GitHub's and linkify's autolinks need, become entities).
"""

from __future__ import annotations

import re
import unicodedata

# Letters (category Lo/So) that render as empty space: readers could pass them for a name.
BLANK_LETTERS = frozenset("\u115f\u1160\u17b4\u17b5\u2800\u3164\uffa0")
_HIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})
_HTML = {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}
_MARKDOWN = frozenset("\\`*_{}[]()#+-!|~")


def is_hidden(char: str) -> bool:
    """A character that shows nothing (or something else) where it stands."""
    return (char in BLANK_LETTERS or unicodedata.category(char) in _HIDDEN_CATEGORIES) and char not in "\t\n\r"


def visible_text(text: object, limit: int = 200) -> str:
    """``text`` on one line with every hidden character escaped, cut to ``limit`` characters."""
    shown = []
    for char in str(text):
        if char.isspace() and not is_hidden(char):
            if shown and shown[-1] != " ":
                shown.append(" ")
        elif is_hidden(char):
            shown.append(f"\\u{ord(char):04x}")
        else:
            shown.append(char)
    line = "".join(shown).strip()
    return line if len(line) <= limit else line[:limit - 3] + "..."


def shown_value(value: object, limit: int = 60) -> str:
    """A value read from a file, as Python writes it (strings quoted), on one line for an error message."""
    return visible_text(repr(value), limit)


def markdown_text(text: object, limit: int = 200) -> str:
    """``visible_text(text, limit)`` as inert Markdown/HTML text (see the module docstring)."""
    line = visible_text(text, limit)
    ordinal = re.match(r"\d+[.)]", line)  # "7. x" at the start of a line would open a numbered list
    list_mark = ordinal.end() - 1 if ordinal else -1
    escaped = []
    for at, char in enumerate(line):
        if char in _HTML:
            escaped.append(_HTML[char])
        elif char == "_" and 0 < at < len(line) - 1 and line[at - 1].isalnum() and line[at + 1].isalnum():
            escaped.append(char)  # inside a word "_" cannot open or close emphasis: clip_text stays readable
        elif char in _MARKDOWN or at == list_mark:
            escaped.append("\\" + char)
        elif _starts_autolink(line, at):
            escaped.append(f"&#{ord(char)};")
        else:
            escaped.append(char)
    return "".join(escaped)


def _starts_autolink(line: str, at: int) -> bool:
    """A character GFM's and linkify's autolinks need where it stands: ``@`` (e-mail), ``://`` (URL), the first
    ``/`` of ``//`` (linkify's scheme-relative ``//localhost/x`` needs no dot), and a ``.`` after anything but a
    space and before a letter or digit (``www.x``, ``evil.com``, ``x$.com``: a domain may hold symbols). As an entity it renders the same and no link starts."""
    char, after = line[at], line[at + 1:at + 3]
    return char == "@" or (char == ":" and after == "//") or (char == "/" and after[:1] == "/") or \
        (char == "." and at > 0 and not line[at - 1].isspace() and after[:1].isalnum())
