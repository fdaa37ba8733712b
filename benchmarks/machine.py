"""What every benchmark records about its run (command, machine, software) and how it writes it."""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import torch  # before toreq: loading toreq._C needs torch's shared libraries

import toreq
from toreq.ops._dispatch import has_kernel


def machine_info(device: torch.device, threads: int, default_threads: int) -> dict:
    """Date, command, versions, CPU model, threads, GPU and git commit of this run."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    info = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command=" ".join(shlex.quote(a) for a in [sys.executable] + sys.argv),
        torch=torch.__version__, toreq=toreq.__version__, python=platform.python_version(),
        platform=platform.platform(), cpu_model=cpu, logical_cpus=os.cpu_count(),
        threads=threads, default_threads=default_threads,
        interop_threads=torch.get_num_interop_threads(), device=str(device),
        mkl=torch.backends.mkl.is_available(), git_commit=commit,
        kernels={f"{op}/{device.type}": has_kernel(op, device.type)
                 for op in ("relax", "hebbian_update")},
    )
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def write_results(out_dir: str | os.PathLike, name: str, record: dict, markdown: str) -> None:
    """Writes ``<name>.json`` and ``<name>.md`` into ``out_dir`` and prints the table."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")
    (out / f"{name}.md").write_text(markdown)
    print(markdown)
