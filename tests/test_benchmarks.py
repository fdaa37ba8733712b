"""The benchmark suite's README update: the README's results are the benchmarks' own output."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_suite():
    spec = importlib.util.spec_from_file_location("benchmarks_main",
                                                  ROOT / "benchmarks" / "__main__.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


def test_marked_blocks_are_replaced_by_the_results(tmp_path):
    suite = load_suite()
    (tmp_path / "accuracy").mkdir()
    (tmp_path / "accuracy" / "accuracy.md").write_text(
        "# Test accuracy\n\n`/opt/py/bin/python3.11 benchmarks/accuracy.py --quick` on today\n\n"
        "## Targets\n\n- PASS digits\n")
    readme = ("intro\n<!-- benchmark:accuracy -->\nold table\n<!-- /benchmark:accuracy -->\n"
              "middle\n<!-- benchmark:memory -->\nold memory\n<!-- /benchmark:memory -->\nend\n")
    text, updated = suite.readme_with_results(readme, tmp_path)
    assert updated == ["accuracy"]  # no memory results: that block stays as it was
    assert text == ("intro\n<!-- benchmark:accuracy -->\n"
                    "`python benchmarks/accuracy.py --quick` on today\n\n#### Targets\n\n"
                    "- PASS digits\n<!-- /benchmark:accuracy -->\n"
                    "middle\n<!-- benchmark:memory -->\nold memory\n<!-- /benchmark:memory -->\n"
                    "end\n")


def test_the_readme_holds_every_benchmark_block_filled():
    suite = load_suite()
    readme = (ROOT / "README.md").read_text()
    for name, markdown in suite.README_BLOCKS.items():
        start, end = f"<!-- benchmark:{name} -->", f"<!-- /benchmark:{name} -->"
        assert start in readme and end in readme, name
        block = readme.split(start, 1)[1].split(end, 1)[0]
        script = Path(markdown).stem  # the benchmark that wrote it
        assert f"benchmarks/{script}.py" in block and "|---" in block, name
