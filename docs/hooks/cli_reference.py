"""MkDocs hook: the command-line reference, generated from toreq's argument parsers at build time.

``docs/cli.md`` holds the marker ``<!-- cli-reference -->``; every build replaces it by one
section per subcommand of ``toreq.cli.make_parser()`` (its description, usage and a table of
every option with its default), so the page cannot fall behind the parsers.
``tests/test_docs.py`` checks the text against the parsers.
"""

from __future__ import annotations

import argparse
import re

MARKER = "<!-- cli-reference -->"
USAGE_WIDTH = 78  # columns of the usage blocks: they fit the page without scrolling

# "(default: X)" or "(default X)" written into a help string or a group title by hand
_STATED_DEFAULT = re.compile(r"\s*\(default:?\s+([^)]*)\)")


def _expand(text: str, prog: str) -> str:
    """``%(prog)s`` and ``%%`` as argparse expands them in the help it prints."""
    try:
        return text % {"prog": prog}
    except (KeyError, TypeError, ValueError):
        return text


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _default(action: argparse.Action, help_text: str, group_title: str) -> tuple[str, str]:
    """The default shown for ``action`` and its help without a hand-written "(default: ...)"."""
    stated = _STATED_DEFAULT.search(help_text)
    if stated:  # the help says it in words: show those words, once
        return stated.group(1).strip(), _STATED_DEFAULT.sub("", help_text, count=1)
    if action.required:
        return "required", help_text
    if isinstance(action, argparse._VersionAction):
        return "", help_text
    if action.default is argparse.SUPPRESS:
        from_group = _STATED_DEFAULT.search(group_title)
        return (from_group.group(1).strip() if from_group else "not set"), help_text
    if action.nargs == 0:  # a flag
        return ("on" if action.default else "off"), help_text
    if action.default is None:
        return "not set", help_text
    if isinstance(action.default, (list, tuple)):
        return "`" + " ".join(map(str, action.default)) + "`", help_text
    if isinstance(action.default, str) and action.default != action.default.strip() or \
            action.default == "":
        return f"`{action.default!r}`", help_text  # whitespace: shown as Python writes it
    return f"`{action.default}`", help_text


def _option_rows(parser: argparse.ArgumentParser) -> list[str]:
    rows = ["| option | default | description |", "|---|---|---|"]
    for group in parser._action_groups:
        title = group.title or ""
        for action in group._group_actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            value = ""
            if action.nargs != 0:
                value = " " + (action.metavar or action.dest.upper())
                value += " ..." if action.nargs in ("+", "*") else ""
            flags = ", ".join(f"`{flag}{value}`" for flag in action.option_strings)
            help_text = _expand(action.help or "", parser.prog) if action.help else ""
            default, help_text = _default(action, help_text, title)
            if action.choices is not None:
                choices = ", ".join(f"`{c}`" for c in action.choices)
                help_text = f"{help_text.rstrip('.')}; one of {choices}" if help_text \
                    else f"one of {choices}"
            rows.append(f"| {flags} | {_cell(default)} | {_cell(help_text)} |")
    return rows


def _subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    """``(name, one-line help, parser)`` of each subcommand, in the order they were added."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
            return [(name, helps.get(name, ""), sub) for name, sub in action.choices.items()]
    return []


def _usage(parser: argparse.ArgumentParser) -> str:
    formatter = argparse.HelpFormatter(parser.prog, width=USAGE_WIDTH)
    formatter.add_usage(parser.usage, parser._actions, parser._mutually_exclusive_groups)
    return formatter.format_help().strip()


def cli_reference(parser: argparse.ArgumentParser | None = None) -> str:
    """The Markdown reference of ``parser`` (default: ``toreq``'s) and all its subcommands."""
    if parser is None:
        from toreq.cli import make_parser

        parser = make_parser()
    subcommands = _subcommands(parser)
    lines = [_expand(parser.description or "", parser.prog), "",
             "| command | what it does |", "|---|---|"]
    lines += [f"| [`{parser.prog} {name}`](#{parser.prog}-{name}) | {_cell(summary)} |"
              for name, summary, _ in subcommands]
    lines += ["", "Options of `toreq` itself:", "", *_option_rows(parser), ""]
    for name, summary, sub in subcommands:
        lines += [f"## {parser.prog} {name}", "", _expand(sub.description or summary, sub.prog),
                  "", "```text", _usage(sub), "```", "", *_option_rows(sub), ""]
    return "\n".join(lines)


def on_page_markdown(markdown: str, page, config, files) -> str:
    if MARKER in markdown:
        return markdown.replace(MARKER, cli_reference())
    return markdown
