"""Every benchmark into one results folder, with an index: ``python -m benchmarks``.

    python -m benchmarks [--quick] [--out results] [--only NAME ...] [--threads N]
    python -m benchmarks --update-docs [--out results]

Runs ``bench_ops.py``, ``memory.py`` and ``accuracy.py`` (see ``README.md`` beside this file),
each in its own subprocess with ``--out <out>/<name>`` and ``--quick`` and ``--threads`` passed
on: the scripts import one another as top-level modules of this folder and time themselves, so
a fresh process per benchmark keeps one from perturbing the next. A benchmark that fails does
not stop the others. Then, from each benchmark's JSON record, it draws ``<out>/<name>/<name>.png``
(with a printed note instead where matplotlib is not installed) and writes ``<out>/README.md``:
the command, the machine, each benchmark's status, command and time, its plot and its Markdown
tables. Exits with 1 when a benchmark failed.

``--update-docs`` (formerly ``--update-readme``, still accepted) runs nothing: it copies each
benchmark's Markdown from the results folder into ``docs/results.md``, between the markers
``<!-- benchmark:NAME -->`` and ``<!-- /benchmark:NAME -->``, and the accuracy benchmark's
headline (:func:`headline`) into the top-level ``README.md`` between
``<!-- headline:accuracy -->`` and ``<!-- /headline:accuracy -->``, so that every published
figure is the benchmarks' own output, with the command that produced it and the machine it ran
on. The control tasks' accuracy run (``python benchmarks/accuracy.py --datasets cartpole acrobot
--out results/accuracy_control``, which needs the ``control`` extra) fills the block
``accuracy_control``.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the benchmarks' own modules are top-level modules of this folder

from plots import write_plots  # noqa: E402

BENCHMARKS = ("bench_ops", "memory", "accuracy")
# results block -> its Markdown under the results folder: each benchmark's own, and the control
# tasks' accuracy run, which needs the control extra and so is its own command
# (``accuracy.py --datasets cartpole acrobot --out <results>/accuracy_control``)
RESULTS_BLOCKS = {**{name: f"{name}/{name}.md" for name in BENCHMARKS},
                  "accuracy_control": "accuracy_control/accuracy.md",
                  # python benchmarks/accuracy.py --conv --datasets mnist (fashion_mnist) --out
                  # <results>/accuracy_conv_mnist (accuracy_conv_fashion_mnist)
                  "accuracy_conv_mnist": "accuracy_conv_mnist/accuracy.md",
                  "accuracy_conv_fashion_mnist": "accuracy_conv_fashion_mnist/accuracy.md",
                  # run on their own: python benchmarks/estimators.py --parts gradients,
                  # python benchmarks/estimators.py --parts learning --out
                  # <results>/estimators_learning, python benchmarks/train_step.py --quick
                  # (see benchmarks/README.md)
                  "estimators": "estimators/estimators.md",
                  "estimators_learning": "estimators_learning/estimators.md",
                  "train_step": "train_step/train_step.md"}
README = HERE.parent / "README.md"
RESULTS_PAGE = HERE.parent / "docs" / "results.md"


@dataclass
class Run:
    """One benchmark's subprocess: its command, exit code, wall time and what it wrote."""

    name: str
    command: list[str]
    returncode: int
    seconds: float
    record: dict | None
    markdown: str
    plots: list[Path]

    @property
    def status(self) -> str:
        if self.returncode != 0:
            return f"failed (exit code {self.returncode})"
        return "ok" if self.record is not None else f"no {self.name}.json written"


def run_benchmark(name: str, out: Path, quick: bool, threads: int) -> Run:
    """Runs ``<name>.py`` into ``out/<name>``, then draws its record's plot."""
    folder = out / name
    command = [sys.executable, str(HERE / f"{name}.py"), "--out", str(folder),
               "--threads", str(threads)] + (["--quick"] if quick else [])
    print(f"== {name}: {shlex.join(command)}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    returncode = subprocess.run(command).returncode
    seconds = time.perf_counter() - started
    json_path, md_path = folder / f"{name}.json", folder / f"{name}.md"
    record = markdown = None
    plots: list[Path] = []
    if returncode == 0 and json_path.exists():  # a failed run may have left an older record
        record = json.loads(json_path.read_text())
        markdown = md_path.read_text() if md_path.exists() else ""
        plots = write_plots(name, record, folder)
    return Run(name, command, returncode, seconds, record, markdown or "", plots)


def machine_line(runs: list[Run]) -> str:
    """The machine, from the first record (every benchmark records the one it ran on)."""
    info = next((r.record["machine"] for r in runs if r.record is not None), None)
    if info is None:
        return "Machine: unknown (no benchmark finished)."
    gpu = f", GPU {info['gpu']} (CUDA {info.get('cuda')})" if "gpu" in info else ""
    return (f"Machine: CPU {info['cpu_model']} ({info['logical_cpus']} logical CPUs){gpu}; "
            f"torch {info['torch']}, toreq {info['toreq']}, Python {info['python']}, "
            f"{info['platform']}; git commit `{info['git_commit'] or 'unknown'}`.")


def index(runs: list[Run], command: str, quick: bool, seconds: float) -> str:
    """``README.md`` of the results folder: command, machine, a status table, then each
    benchmark's own Markdown (headings one level down) with its plot under its title."""
    lines = ["# toreq benchmark results", "",
             f"`{command}` ({'quick runs' if quick else 'full runs'}, {seconds:.0f} s in all).",
             "", machine_line(runs), "",
             "| benchmark | status | time | command | files |", "|---|---|---:|---|---|"]
    for r in runs:
        files = ([f"[{name}]({r.name}/{name})" for name in
                  [f"{r.name}.json", f"{r.name}.md", *(p.name for p in r.plots)]]
                 if r.record is not None else ["-"])
        shown = shlex.join(["python", f"benchmarks/{r.name}.py", *r.command[2:]])
        lines.append(f"| {r.name} | {r.status} | {r.seconds:.0f} s | `{shown}` | "
                     f"{', '.join(files)} |")
    for r in runs:
        if r.record is None:
            lines += ["", f"## {r.name}", "", f"No results: {r.status}."]
            continue
        own = ["#" + line if line.startswith("#") else line
               for line in r.markdown.strip().splitlines()]
        title, body = ((own[0], own[1:]) if own and own[0].startswith("## ")
                       else (f"## {r.name}", own))
        lines += ["", title, "", *(f"![{r.name}]({r.name}/{p.name})" for p in r.plots), *body]
    return "\n".join(lines) + "\n"


def with_results(readme: str, out: Path) -> tuple[str, list[str]]:
    """``readme`` (a page's text) with each benchmark's marked block replaced by
    ``out/NAME/NAME.md``.

    The benchmark's own title is dropped (the page has its own) and its headings go two levels
    down, under the page's sections; the interpreter's path in the recorded command becomes
    ``python``. Returns the new text and the names of the blocks replaced: a block whose results
    file is missing is left as it was.
    """
    updated = []
    for name, markdown in RESULTS_BLOCKS.items():
        start, end = f"<!-- benchmark:{name} -->", f"<!-- /benchmark:{name} -->"
        path = out / markdown
        if start not in readme or end not in readme or not path.exists():
            continue
        lines = path.read_text().strip().splitlines()
        if lines and lines[0].startswith("# "):
            lines = lines[1:]
        body = "\n".join("##" + line if line.startswith("#") else line for line in lines).strip()
        body = re.sub(r"`\S*python[0-9.]* ", "`python ", body)
        before, rest = readme.split(start, 1)
        readme = f"{before}{start}\n{body}\n{end}{rest.split(end, 1)[1]}"
        updated.append(name)
    return readme, updated


def headline(accuracy_md: str) -> str:
    """The README's short results table from the accuracy benchmark's Markdown: per data set,
    EqProp's and same-width backprop's test accuracy, under the line naming the command and the
    machine."""
    lines = accuracy_md.strip().splitlines()
    command = next(line for line in lines if line.startswith("`"))
    command = re.sub(r"`\S*python[0-9.]* ", "`python ", command)
    rows: dict[str, dict[str, list[str]]] = {}
    for line in lines:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) >= 6 and cells[2] in ("eqprop", "backprop"):
            rows.setdefault(cells[0], {})[cells[2]] = cells
    table = ["| data set | EqProp test accuracy | backprop, same width | seeds |",
             "|---|---:|---:|---:|"]
    table += [f"| {data} | {r['eqprop'][5]} | {r['backprop'][5]} | {r['eqprop'][4]} |"
              for data, r in rows.items() if {"eqprop", "backprop"} <= set(r)]
    return "\n".join([command, "", *table])


def estimators_headline(estimators_md: str) -> str:
    """The README's short table of the learning rules from the estimators benchmark's learning
    Markdown: one row per algorithm, one column per data set and network (test accuracy, and
    seconds per epoch in brackets), under the line naming the command and the machine and the
    settings line (the comparison with the comparative study stays on the results page)."""
    lines = estimators_md.strip().splitlines()
    command = re.sub(r"`\S*python[0-9.]* ", "`python ", next(line for line in lines
                                                            if line.startswith("`")))
    settings = next(line for line in lines if " epoch(s), batch " in line)
    cells: dict[str, dict[tuple[str, str], str]] = {}
    for line in lines:
        row = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(row) == 5 and row[0] not in ("data", "---"):
            cells.setdefault(row[2], {})[(row[0], row[1])] = f"{row[3]} ({row[4]}s)"
    columns = list(dict.fromkeys(key for row in cells.values() for key in row))
    table = ["| algorithm | " + " | ".join(f"{d}, {n.replace('DHN ', '')}" for d, n in columns)
             + " |", "|---|" + "---:|" * len(columns)]
    table += [f"| {name} | " + " | ".join(row.get(c, "-") for c in columns) + " |"
              for name, row in cells.items()]
    return "\n".join([command, "", settings, "", *table])


# README blocks ``<!-- headline:NAME -->``: the results file each is made from, and how
HEADLINES = {"accuracy": ("accuracy/accuracy.md", headline),
             "estimators": ("estimators_learning/estimators.md", estimators_headline)}


def update_docs(out: Path, readme: Path = README, page: Path = RESULTS_PAGE) -> list[str]:
    """Fills ``page``'s benchmark blocks and ``readme``'s headlines (:data:`HEADLINES`) from the
    results in ``out``; returns what was updated."""
    text, updated = with_results(page.read_text(), out)
    page.write_text(text)
    for name, (markdown, make) in HEADLINES.items():
        source = out / markdown
        start, end = f"<!-- headline:{name} -->", f"<!-- /headline:{name} -->"
        current = readme.read_text()
        if source.exists() and start in current and end in current:
            before, rest = current.split(start, 1)
            readme.write_text(f"{before}{start}\n{make(source.read_text())}\n{end}"
                              f"{rest.split(end, 1)[1]}")
            updated.append("README headline" if name == "accuracy" else f"README {name} headline")
    return updated


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="each benchmark's --quick mode (CI-sized runs)")
    parser.add_argument("--out", default="results", help="results folder (default: results)")
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, default=list(BENCHMARKS),
                        help="run only these benchmarks")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads of every benchmark (default 1: on a shared "
                             "machine multi-threaded small matrix products stall whenever "
                             "another process holds a core; see memory.py)")
    parser.add_argument("--update-docs", "--update-readme", dest="update_docs",
                        action="store_true",
                        help="run nothing: copy the results' Markdown into docs/results.md's "
                             "marked blocks and the accuracy headline into README.md")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.update_docs:
        updated = update_docs(Path(args.out))
        print(f"updated {', '.join(updated) or 'no'} block(s) of {RESULTS_PAGE} and {README}",
              file=sys.stderr)
        return 0 if updated else 1
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", "-m", "benchmarks",
                          *(sys.argv[1:] if argv is None else argv)])
    started = time.perf_counter()
    runs = [run_benchmark(name, out, args.quick, args.threads) for name in args.only]
    (out / "README.md").write_text(index(runs, command, args.quick,
                                         time.perf_counter() - started))
    for r in runs:
        print(f"{r.name:<10} {r.status} ({r.seconds:.0f} s)", file=sys.stderr)
    print(f"wrote {out / 'README.md'}", file=sys.stderr)
    return 0 if all(r.status == "ok" for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
