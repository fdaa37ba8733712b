"""MkDocs hook: the equations typeset to MathML when the site is built, so it needs no script.

``pymdownx.arithmatex`` (generic mode) finds the math in the Markdown pages and in the
docstrings, ``$...$`` inline and ``$$...$$`` displayed, and leaves each formula as TeX in a
``<span class="arithmatex">`` or ``<div class="arithmatex">``; this hook replaces that TeX by
the MathML that ``latex2mathml`` writes for it. Browsers render MathML themselves, so the built
site shows its equations offline. A formula that latex2mathml cannot read, or that holds a
command it does not know (it would print the command as text), fails the build.
"""

from __future__ import annotations

import html
import re

from latex2mathml.converter import convert

# what arithmatex writes in generic mode: \( ... \) in a span, \[ ... \] in a div
_INLINE = re.compile(r'<span class="arithmatex">\\\((.*?)\\\)</span>', re.S)
_DISPLAY = re.compile(r'<div class="arithmatex">\\\[(.*?)\\\]</div>', re.S)
# a command latex2mathml does not know comes out as its name in a token element
_UNKNOWN_COMMAND = re.compile(r">(\\[A-Za-z]+)<")


def to_mathml(html_text: str) -> str:
    """``html_text`` with every arithmatex formula replaced by MathML (inline or display)."""
    def typeset(match: re.Match, display: str) -> str:
        tex = html.unescape(match.group(1)).strip()
        try:
            mathml = convert(tex, display=display)
        except Exception as error:  # latex2mathml raises its own types, and IndexError
            raise ValueError(f"docs: cannot typeset the formula {tex!r}: {error!r}") from error
        unknown = _UNKNOWN_COMMAND.search(mathml)
        if unknown:
            raise ValueError(f"docs: cannot typeset the formula {tex!r}: latex2mathml does not "
                             f"know {unknown.group(1)}")
        return mathml

    html_text = _DISPLAY.sub(lambda m: typeset(m, "block"), html_text)
    return _INLINE.sub(lambda m: typeset(m, "inline"), html_text)


def on_page_content(html_text: str, page, config, files) -> str:
    return to_mathml(html_text)
