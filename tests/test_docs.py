"""The documentation builds without warnings, documents the public API and quotes what it measured."""

from __future__ import annotations

import importlib
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
API_PAGES = ["ops", "nn", "train", "checkpoint", "validation", "errors", "data", "diagnostics", "presets", "utils", "distributed",
             "export", "validate"]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """``mkdocs build --strict`` into a temporary folder (the ``docs`` extra installs mkdocs)."""
    for module in ("mkdocs", "mkdocstrings", "mkdocstrings_handlers.python"):
        pytest.importorskip(module, reason=f"{module} is not installed: pip install -e '.[docs]'")
    out = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
         str(ROOT / "mkdocs.yml"), "--site-dir", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "WARNING" not in result.stderr, result.stderr
    return out


def test_docs_build_strict(site):
    for page in ["index.html", "concepts/index.html", "hyperparameters/index.html",
                 "guide/index.html", "results/index.html"]:
        assert (site / page).exists(), page
    assert 'class="arithmatex"' in (site / "concepts" / "index.html").read_text()  # the equations


@pytest.mark.parametrize("name", API_PAGES)
def test_api_reference_documents_every_public_class_and_function(site, name):
    """Each public name on its module's page; a name re-exported from another module (e.g.
    toreq.train's checkpoint functions) on the page of the module that defines it."""
    module = importlib.import_module(f"toreq.{name}")
    anchors = {page: set(re.findall(r'id="(toreq\.[\w.]+)"', (site / "api" / page / "index.html")
                                    .read_text())) for page in API_PAGES}
    everywhere = set().union(*anchors.values())
    missing = [f"{obj.__module__}.{attr}" for attr in module.__all__
               for obj in [getattr(module, attr)]
               if (inspect.isclass(obj) or inspect.isfunction(obj))
               and f"{obj.__module__}.{attr}" not in
               (anchors[name] if obj.__module__.startswith(f"toreq.{name}") else everywhere)]
    assert not missing, f"docs/api/{name}.md does not document {missing}"


def test_hyperparameter_page_quotes_the_presets_measurements():
    from toreq.presets import PRESETS

    page = (DOCS / "hyperparameters.md").read_text()
    for preset in PRESETS.values():
        assert preset.result, f"preset {preset.name} has no measured result"
        assert f"- `{preset.name}`: {preset.result}" in page, \
            f"docs/hyperparameters.md does not quote preset {preset.name}'s result; update it"
        row = next(line for line in page.splitlines() if line.startswith(f"| `{preset.name}` |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1:4] == [str(preset.hidden), str(preset.epochs), str(preset.batch_size)], row
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
