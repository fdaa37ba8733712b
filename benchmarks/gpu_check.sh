#!/usr/bin/env bash
# The GPU check: everything about toreq's CUDA kernels that needs a GPU, in one call, with every
# result under one folder. Sized for one H100/H200-class GPU: under 10 minutes, build included
# (each step has a time limit; a step that fails or runs out of time is recorded and the others
# still run).
#
#   bash benchmarks/gpu_check.sh [--out DIR] [--dry-run]
#
# Steps, each writing <out>/<step>.log (and its own results where it has some):
#   build        TOREQ_CUDA=ON pip install -e . (no dependencies fetched: none can be, offline),
#                for the GPU's own architecture
#   pytest_cuda  pytest -m cuda: the CUDA kernels against the CPU kernels and the references
#                (float32/64, float16/bfloat16, CUDA graphs against eager launches, streams,
#                devices, opcheck); JUnit XML in pytest_cuda.xml
#   bench_ops    benchmarks/bench_ops.py --quick --device cuda (relaxation, steps to tolerance,
#                Hebbian update, one row per dtype), CUDA graphs on (the default)
#   bench_ops_eager  the same with TOREQ_CUDA_GRAPHS=0 (every kernel launched): the graphs' gain
#   memory       benchmarks/memory.py --quick --device cuda: peak memory and the time of one
#                training step (EqProp against BPTT) against the number of relaxation steps
#   lm_study     toreq lm-study --quick --scales 1.0 --experiments variants --device cuda: one
#                scale of the language-model study
# then <out>/summary.md: each step's status, time and log, and the machine.
#
# --dry-run runs nothing heavy: it checks that every command exists and parses (each Python
# entry point runs with --help, and every option the check passes must appear in that help;
# pytest collects the cuda tests), so CI catches a renamed script or option on any machine.
#
#   PYTHON=python  the interpreter whose torch (with CUDA) the check builds against and runs
set -uo pipefail
cd "$(dirname "$0")/.."

out=results/gpu_check
dry_run=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) sed -n '2,29p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check: unknown argument '$1' (expected --out DIR or --dry-run)" >&2; exit 2 ;;
  esac
done
python="${PYTHON:-python}"
if ! command -v "$python" > /dev/null 2>&1; then
  echo "gpu_check: PYTHON=$python is not an executable" >&2
  exit 2
fi
mkdir -p "$out"
out=$(cd "$out" && pwd)
started=$SECONDS
failed=0
rows=()

# run NAME LIMIT_S [ENV=VALUE ...] -- COMMAND...: runs COMMAND with a time limit, its output in
# <out>/NAME.log, and records the status. In a dry run, checks COMMAND instead (see check).
run() {
  local name="$1" limit="$2"
  shift 2
  local env=()
  while [ "$1" != "--" ]; do env+=("$1"); shift; done
  shift
  if [ "$dry_run" -eq 1 ]; then
    if check "$name" "$@" > "$out/$name.log" 2>&1; then
      rows+=("| $name | parses | - | $name.log |")
      echo "ok      $name"
    else
      rows+=("| $name | **does not parse** | - | $name.log |")
      echo "FAILED  $name"; cat "$out/$name.log"
      failed=$((failed + 1))
    fi
    return
  fi
  local step_started=$SECONDS rc
  echo "== $name (limit ${limit} s): ${env[*]} $*"
  env "${env[@]}" timeout --signal=TERM --kill-after=10 "$limit" "$@" > "$out/$name.log" 2>&1
  rc=$?
  local seconds=$((SECONDS - step_started)) status="ok"
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    status="**timed out** (limit ${limit} s)"
  elif [ "$rc" -ne 0 ]; then
    status="**failed** (exit $rc)"
  fi
  [ "$status" = "ok" ] || failed=$((failed + 1))
  rows+=("| $name | $status | $seconds | $name.log |")
  echo "   $status in ${seconds} s"
  [ "$status" = "ok" ] || tail -n 20 "$out/$name.log"
}

# check NAME COMMAND...: the dry run of one command. A Python script or `-m module` runs with
# --help (for `toreq SUB`, `toreq SUB --help`), and every --option of COMMAND must be in that
# help; pytest collects; pip must import.
check() {
  local name="$1"
  shift
  local help_cmd=()
  case "$name" in
    build) "$python" -m pip --version && "$python" -c "import scikit_build_core, ninja"; return ;;
    pytest_cuda) "$python" -m pytest --collect-only -q -m cuda tests/ | tail -n 3; return ;;
  esac
  if [ "$1" = "$python" ] && [ "${2:-}" = "-m" ]; then
    help_cmd=("$1" -m "$3")
    [ "$3" = "toreq" ] && help_cmd+=("$4")
  elif [ "$1" = "$python" ]; then
    [ -f "$2" ] || { echo "no such script: $2"; return 1; }
    help_cmd=("$1" "$2")
  else
    command -v "$1" || { echo "no such command: $1"; return 1; }
    help_cmd=("$1")
  fi
  local help
  help=$("${help_cmd[@]}" --help 2>&1) || { echo "$help"; echo "'${help_cmd[*]} --help' failed"; return 1; }
  echo "$help"
  local arg
  for arg in "$@"; do
    case "$arg" in
      --*)
        # the whole option: --scale must not pass for --scales
        if ! grep -qE -- "${arg%%=*}([^[:alnum:]_-]|\$)" <<< "$help"; then
          echo "option $arg is not in the help of ${help_cmd[*]}"
          return 1
        fi ;;
    esac
  done
}

# The GPU's architecture (e.g. 90 on an H100/H200), so that nvcc compiles for it alone.
if [ "$dry_run" -eq 0 ]; then
  arch=$("$python" -c "import torch; major, minor = torch.cuda.get_device_capability(); print(f'{major}{minor}')" 2> "$out/environment.log")
  if [ -z "$arch" ]; then
    echo "gpu_check: torch finds no CUDA device (see $out/environment.log)" >&2
    exit 1
  fi
  {
    nvidia-smi 2>&1 || true
    "$python" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name())"
    command -v nvcc && nvcc --version | tail -n 1
  } >> "$out/environment.log"
else
  arch=90
fi

# Time limits (seconds) summing to under 10 minutes; the language-model study, which saves
# each finished run as it goes, gets whatever is left of TOTAL_S.
total_s=570
run build 180 TOREQ_CUDA=ON "CMAKE_CUDA_ARCHITECTURES=$arch" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" -- \
  "$python" -m pip install --no-build-isolation --no-deps -e .
run pytest_cuda 140 -- "$python" -m pytest -m cuda -q -p no:cacheprovider \
  --junitxml="$out/pytest_cuda.xml" tests/
run bench_ops 45 -- "$python" benchmarks/bench_ops.py --quick --budget 0.25 --device cuda \
  --out "$out/bench_ops"
run bench_ops_eager 35 TOREQ_CUDA_GRAPHS=0 -- "$python" benchmarks/bench_ops.py --quick \
  --budget 0.25 --device cuda --out "$out/bench_ops_eager"
run memory 50 -- "$python" benchmarks/memory.py --quick --device cuda --out "$out/memory"
run lm_study $((total_s - (SECONDS - started) > 30 ? total_s - (SECONDS - started) : 30)) -- \
  "$python" -m toreq lm-study --quick --experiments variants --scales 1.0 --device cuda \
  --out "$out/lm_study"

{
  echo "# GPU check"
  echo
  echo "\`bash benchmarks/gpu_check.sh$([ "$dry_run" -eq 1 ] && echo " --dry-run")\` on $(date -u '+%Y-%m-%d %H:%M UTC'), $((SECONDS - started)) s in all; $failed step(s) failed."
  echo
  echo '```'
  if [ -f "$out/environment.log" ]; then grep -E '^torch|NVIDIA-SMI|Cuda compilation|release' "$out/environment.log"; fi
  echo '```'
  echo
  echo "| step | status | seconds | log |"
  echo "|---|---|---:|---|"
  printf '%s\n' "${rows[@]}"
} > "$out/summary.md"
cat "$out/summary.md"
[ "$failed" -eq 0 ]
