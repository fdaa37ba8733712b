"""The documentation builds without warnings, documents the public API and quotes what it measured."""

from __future__ import annotations

import argparse
import importlib
import os
import importlib.util
import inspect
import pkgutil
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
# a role as rendered: its backticks may have become a code element, leaving ":func:name"
RAW_RST = re.compile(r":(func|meth|class|mod|data|attr|exc|obj):|\.\. (math|code-block)::")
# TeX that was not typeset (a $$ block Markdown did not see as one, a formula outside $...$)
RAW_TEX = re.compile(r"\$\$|\\(frac|sum|left|right|top|tanh|leftarrow|beta|rho|nabla|mathrm)\b")


def package_modules() -> list[str]:
    """Every public module of toreq (no part of its dotted name starts with ``_``)."""
    import toreq

    return ["toreq"] + [m.name for m in pkgutil.walk_packages(toreq.__path__, "toreq.")
                        if not any(part.startswith("_") for part in m.name.split("."))]


def build_site(out: Path) -> Path:
    """``mkdocs build --strict`` into ``out`` (the ``docs`` extra installs what it needs)."""
    for module in ("mkdocs", "mkdocstrings", "mkdocstrings_handlers.python", "material",
                   "latex2mathml"):
        pytest.importorskip(module, reason=f"{module} is not installed: pip install -e '.[docs]'")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
         str(ROOT / "mkdocs.yml"), "--site-dir", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})  # the theme's end-of-life banner
    assert result.returncode == 0, result.stdout + result.stderr
    assert not re.search(r"^WARNING", result.stderr, flags=re.M), result.stderr
    return out


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    return build_site(tmp_path_factory.mktemp("site"))


def load_hook(name: str):
    """A module of docs/hooks/ (MkDocs loads them by path; they are not part of the package)."""
    spec = importlib.util.spec_from_file_location(f"docs_hook_{name}", DOCS / "hooks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class ModuleText(HTMLParser):
    """The text of each module's section of an API page, keyed by the module's dotted name.

    mkdocstrings puts a module in ``<div class="doc doc-object doc-module">`` whose heading's id
    is the module's path; text outside any titled module section goes under ``page``.
    """

    def __init__(self, page: str):
        super().__init__()
        self.stack: list[str | None] = []  # per open div: the module it opens, or None
        self.current = [page]
        self.text: dict[str, list[str]] = {page: []}
        self.pending = False  # a module div is open and waits for its heading

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "div":
            opens = "doc-module" in (attrs.get("class") or "").split()
            self.stack.append("module" if opens else None)
            self.pending = self.pending or opens
        elif self.pending and re.fullmatch(r"h[1-6]", tag) and attrs.get("id", "").startswith("toreq"):
            self.current.append(attrs["id"])
            self.text.setdefault(attrs["id"], [])
            self.stack[-1] = "titled"
            self.pending = False

    def handle_endtag(self, tag):
        if tag == "div" and self.stack:
            if self.stack.pop() == "titled":
                self.current.pop()

    def handle_data(self, data):
        self.text[self.current[-1]].append(data)


def module_text(site: Path, module: str) -> str:
    """The rendered text of ``module``'s documentation (its section, or its whole page)."""
    for page in sorted((DOCS / "api").glob("*.md")):
        directives = re.findall(r"^::: ([\w.]+)", page.read_text(), flags=re.M)
        if module in directives:
            parser = ModuleText(page.stem)
            parser.feed((site / "api" / page.stem / "index.html").read_text())
            if len(directives) == 1:
                return "".join(t for texts in parser.text.values() for t in texts)
            assert module in parser.text, f"docs/api/{page.name}: no section for {module}"
            return "".join(parser.text[module])
    raise AssertionError(f"no page of docs/api/ documents {module} (a '::: {module}' line)")


def test_docs_build_strict(site):
    for page in ["index.html", "concepts/index.html", "hyperparameters/index.html",
                 "papers/index.html", "cli/index.html", "contributing/index.html",
                 "guide/index.html", "results/index.html"]:
        assert (site / page).exists(), page
    concepts = (site / "concepts" / "index.html").read_text()
    # the equations are MathML written at build time: no TeX left for a script, and no script
    assert concepts.count("<math") > 50, "the concepts page lost its equations"
    assert 'display="block"' in concepts
    assert "arithmatex" not in concepts and "\\frac" not in concepts
    for html in site.rglob("*.html"):
        text = html.read_text()
        assert "mathjax" not in text.lower() and "cdn.jsdelivr" not in text, html
        assert "fonts.googleapis" not in text, f"{html}: the theme loads web fonts"


def test_mathml_hook_typesets_inline_and_display_math_and_refuses_bad_tex():
    hook = load_hook("mathml")
    html = hook.to_mathml('<p>with <span class="arithmatex">\\(\\beta &lt; 1\\)</span></p>'
                          '<div class="arithmatex">\\[\\frac{1}{B}\\]</div>')
    assert '<math xmlns="http://www.w3.org/1998/Math/MathML" display="inline">' in html
    assert "<mi>&#x003B2;</mi><mo>&#x0003C;</mo><mn>1</mn>" in html  # beta < 1, unescaped first
    assert '<math xmlns="http://www.w3.org/1998/Math/MathML" display="block"><mrow><mfrac>' in html
    assert "arithmatex" not in html
    with pytest.raises(ValueError, match="cannot typeset"):
        hook.to_mathml('<span class="arithmatex">\\(\\left( x\\)</span>')
    with pytest.raises(ValueError, match=r"does not know \\bta"):
        hook.to_mathml('<span class="arithmatex">\\(\\bta + 1\\)</span>')


def public_names() -> list[tuple[str, str, str]]:
    """``(module, name, the dotted path of its API entry)`` for every name in an ``__all__``."""
    names = []
    for module_name in package_modules():
        module = importlib.import_module(module_name)
        for name in getattr(module, "__all__", ()):
            obj = getattr(module, name)
            if inspect.ismodule(obj):
                path = obj.__name__
            elif inspect.isclass(obj) or inspect.isfunction(obj):
                path = f"{obj.__module__}.{obj.__qualname__}"
            else:  # data: documented where it is defined
                path = f"{module_name}.{name}"
            names.append((module_name, name, path))
    return names


def test_every_public_name_has_an_api_entry(site):
    names = public_names()
    assert ("toreq", "__version__", "toreq.__version__") in names
    assert len(names) > 100
    anchors = set()
    for page in (site / "api").glob("*/index.html"):
        anchors |= set(re.findall(r'id="(toreq[\w.]*)"', page.read_text()))
    missing = [f"{module}.{name} (entry {path})" for module, name, path in names
               if path not in anchors]
    assert not missing, f"no API entry for {missing}"


def check_rendered(module: str, text: str) -> None:
    """Fails when ``text``, a module's rendered documentation, is empty or shows raw markup."""
    assert len(text) > 200, f"{module}: its documentation is empty"
    raw = sorted({m.group(0) for m in RAW_RST.finditer(text)})
    assert not raw, f"{module}'s built documentation shows raw reStructuredText: {raw}"
    tex = sorted({m.group(0) for m in RAW_TEX.finditer(text)})
    assert not tex, f"{module}'s built documentation shows TeX as text: {tex}"


# Every module's docstrings follow docs/contributing.md (Markdown, $...$ math, [`x`][path]
# links), and a new module needs an API page (a '::: module' line in docs/api/).
@pytest.mark.parametrize("module", package_modules())
def test_every_module_renders_no_restructuredtext(site, module):
    check_rendered(module, module_text(site, module))


def test_rendering_check_fails_on_raw_markup_in_a_module_section():
    # the check above can fail: in a page of three module sections, the one left in
    # reStructuredText and the one with TeX that was not typeset are caught, the clean one not
    prose = "Relaxes a layered network to equilibrium, one phase at a time. " * 4

    def section(module: str, body: str) -> str:
        return (f'<div class="doc doc-object doc-module"><h2 id="{module}">{module}</h2>'
                f'<div class="doc doc-contents"><p>{prose}</p>{body}</div></div>')

    parser = ModuleText("page")
    parser.feed(section("toreq.raw", "<p>See :func:<code>relax</code> and</p>"
                                     "<p>.. math:: h \\leftarrow \\rho(W h)</p>")
                + section("toreq.tex", "<p>$$ h \\leftarrow \\rho(W h) $$</p>")
                + section("toreq.clean", '<p>See <a href="#toreq.raw"><code>relax</code></a> and'
                                         ' <math><mi>h</mi></math>.</p>'))
    text = {module: "".join(parts) for module, parts in parser.text.items()}
    assert set(text) == {"page", "toreq.raw", "toreq.tex", "toreq.clean"}
    # a role whose backticks rendered as a code element still shows as ":func:relax"
    with pytest.raises(AssertionError, match=re.escape("raw reStructuredText: ['.. math::', "
                                                       "':func:']")):
        check_rendered("toreq.raw", text["toreq.raw"])
    with pytest.raises(AssertionError, match=re.escape("TeX as text: ['$$', '\\\\leftarrow', "
                                                       "'\\\\rho']")):
        check_rendered("toreq.tex", text["toreq.tex"])
    check_rendered("toreq.clean", text["toreq.clean"])


def cli_actions(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from ((f"{parser.prog} {name}", a) for a in sub._actions
                            if not isinstance(a, argparse._HelpAction))
        elif not isinstance(action, argparse._HelpAction):
            yield parser.prog, action


def test_cli_reference_lists_every_subcommand_and_option_with_its_default():
    from toreq.cli import make_parser

    text = load_hook("cli_reference").cli_reference(make_parser())
    sections = dict(re.findall(r"^## (toreq [\w-]+)\n(.*?)(?=^## |\Z)", text, flags=re.M | re.S))
    commands = {command for command, _ in cli_actions(make_parser())} - {"toreq"}
    assert set(sections) == commands == {
        "toreq train", "toreq export", "toreq lm-train", "toreq lm-study", "toreq generate",
        "toreq validate"}
    for command, action in cli_actions(make_parser()):
        body = sections.get(command, text)
        row = next((line for line in body.splitlines()
                    if line.startswith(f"| `{action.option_strings[0]}")), None)
        assert row is not None, f"{command} {action.option_strings[0]} is not in the reference"
        default = row.split(" | ")[1]
        if action.required:
            assert default == "required", row
        elif isinstance(action.default, (int, float, str)) and not isinstance(action.default, bool) \
                and action.default is not argparse.SUPPRESS and "(default" not in (action.help or ""):
            shown = repr(action.default) if action.default.__class__ is str \
                and action.default != action.default.strip() else action.default
            assert default == f"`{shown}`", row
        assert row.count("default") <= 1, f"a doubled default: {row}"
    train = sections["toreq train"]
    assert "| `--preset PRESET` | the data set's preset | the configuration to start from;" in train
    assert "| `--lr LR` | the preset's | learning rate (AdamW: annealed to 0" in train
    assert "| `--deterministic` | off |" in train
    assert "| `--seeds SEEDS` | 5; with --quick 2 | seeds per claim |" in sections["toreq validate"]
    assert "| `--checkpoint CHECKPOINT` | required |" in sections["toreq generate"]
    assert "95% confidence" in sections["toreq validate"]  # argparse's %% expanded once


def test_cli_page_is_generated_from_the_parsers(site):
    html = (site / "cli" / "index.html").read_text()
    assert "cli-reference" not in html  # the marker was replaced
    for command, action in cli_actions(__import__("toreq.cli").cli.make_parser()):
        assert f'id="{command.replace(" ", "-")}"' in html or command == "toreq", command
        assert f"<code>{action.option_strings[0]}" in html, (command, action.option_strings)


def test_paper_page_names_every_preset():
    from toreq.presets import PRESETS

    page = (DOCS / "papers.md").read_text()
    for name, preset in PRESETS.items():
        row = next((line for line in page.splitlines() if line.startswith(f"| `{name}` |")), None)
        assert row is not None, f"docs/papers.md does not list preset {name}"
        assert preset.command in row, f"docs/papers.md: {name}'s command is not {preset.command}"
        if preset.paper:  # the papers' presets: the measured figure itself is in the row
            assert preset.result in row, f"docs/papers.md does not quote {name}'s result"
    assert "not reproduced here yet" in page


def test_hyperparameter_page_quotes_the_presets_measurements():
    from toreq.presets import PRESETS

    page = (DOCS / "hyperparameters.md").read_text()
    for preset in PRESETS.values():
        assert preset.result, f"preset {preset.name} has no measured result"
        if preset.paper:
            continue  # a paper's configuration: docs/papers.md quotes it (test above)
        assert f"- `{preset.name}`: {preset.result}" in page, \
            f"docs/hyperparameters.md does not quote preset {preset.name}'s result; update it"
        row = next(line for line in page.splitlines() if line.startswith(f"| `{preset.name}` |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        size = (f"channels {', '.join(map(str, preset.channels))}" if preset.model == "conv_ep"
                else str(preset.hidden))
        assert cells[1:4] == [size, str(preset.epochs), str(preset.batch_size)], row
        beta, nudging = cells[5].split(", ")
        assert (float(cells[4]), float(beta)) == (preset.lr, preset.beta), row
        assert nudging == ("symmetric" if preset.symmetric_nudging else "one-sided"), row
        assert cells[6] == f"{preset.free_steps} / {preset.nudged_steps}", row


def test_python_blocks_in_the_docs_run(capsys):
    blocks = [(page.name, block) for page in sorted(DOCS.glob("*.md"))
              for block in re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)]
    assert blocks
    for name, block in blocks:
        exec(compile(block, f"docs/{name}", "exec"), {})
