"""User strings made safe for what the package writes: Markdown table cells, HTML text and attributes, and the
command line a report records. Class names, texts, words and paths come from users and files; a ``|`` or a
newline would break a Markdown table, and ``<script>`` in a class name must render as text in a page."""
from __future__ import annotations

import html
import shlex
from typing import Any, Iterable, Sequence

__all__ = ["md_cell", "md_row", "html_text", "html_attr", "command_line"]


def md_cell(value: Any) -> str:
    """``value`` as the text of one Markdown table cell: pipes escaped, line breaks folded into spaces, and
    ``<``/``>``/``&`` escaped so a renderer shows them instead of interpreting them."""
    text = " ".join(str(value).split())
    return html.escape(text, quote=False).replace("|", "\\|")


def md_row(cells: Iterable[Any]) -> str:
    """One Markdown table row from raw cell values (each passed through :func:`md_cell`)."""
    return "| " + " | ".join(md_cell(c) for c in cells) + " |"


def html_text(value: Any) -> str:
    """``value`` escaped for HTML element content (``<script>`` renders as text)."""
    return html.escape(str(value), quote=False)


def html_attr(value: Any) -> str:
    """``value`` escaped for a quoted HTML attribute value."""
    return html.escape(str(value), quote=True)


def command_line(argv: Sequence[str], program: str = "nha") -> str:
    """The command as a user could paste it back into a POSIX shell (every argument quoted as needed)."""
    return shlex.join([program, *map(str, argv)])
