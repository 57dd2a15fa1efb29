"""User strings in what the package writes: a Markdown table keeps its shape, HTML shows markup as text, and a
recorded command line parses back to the same arguments."""
import html.parser
import shlex

from nha_plugin.markup import command_line, html_attr, html_text, md_cell, md_row

NASTY = ["a|b", "two\nlines", "<script>alert(1)</script>", 'quote " and \' & amp', "  spaced\tout  "]


def test_markdown_rows_keep_their_columns():
    row = md_row(NASTY)
    assert "\n" not in row and "<script>" not in row
    # a Markdown table splits a row on unescaped pipes: exactly one cell per value
    cells = [c for c in row.replace("\\|", "\0").split("|")][1:-1]
    assert len(cells) == len(NASTY)
    assert md_cell("a|b") == "a\\|b" and md_cell("two\nlines") == "two lines"


def test_html_shows_markup_as_text():
    class Collect(html.parser.HTMLParser):
        def __init__(self):
            super().__init__()
            self.tags, self.text, self.attrs = [], "", []

        def handle_starttag(self, tag, attrs):
            self.tags.append(tag)
            self.attrs += attrs

        def handle_data(self, data):
            self.text += data

    for value in NASTY:
        p = Collect()
        p.feed(f'<span title="{html_attr(value)}">{html_text(value)}</span>')
        p.close()
        assert p.tags == ["span"], value                       # no tag smuggled in
        assert p.text == value and p.attrs == [("title", value)]


def test_command_line_round_trips_through_the_shell():
    argv = ["segment", "--classes", "a b", "--out", "x;rm -rf /", "--text", "it's"]
    line = command_line(argv)
    assert shlex.split(line) == ["nha", *argv]

