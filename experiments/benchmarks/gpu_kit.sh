#!/usr/bin/env bash
# The GPU benchmark's kit, for a GPU machine with no network and its own Python stack
# (jax 0.11.2, no grain / tensorflow-datasets; see gpu_image.txt):
#
#   bash experiments/benchmarks/gpu_kit.sh fetch          # here, with PyPI: the wheels -> .kit/
#   bash experiments/benchmarks/gpu_kit.sh run [FLAGS]    # there, with .kit carried: the suite
#   bash experiments/benchmarks/gpu_kit.sh check          # here: run's smoke on the image's stack
#
# fetch downloads the wheels of gpu_kit.txt for CPython 3.12 on x86_64 Linux (whatever this machine
# is) into .kit/ (git ignores it; carry it to the GPU machine) and prints their size with the
# repo's, which must fit the 64 MiB that travels. run installs them with --no-deps into a local
# folder, puts it and the repo on PYTHONPATH and runs gpu_suite.py, its JSON and Markdown under
# $OUT (the folder that comes back) when that is set; FLAGS go to gpu_suite.py. check builds a CPU
# venv of the image's packages (gpu_image.txt), fetches the kit and runs `run --smoke` there, as
# CI does.
#
# Environment: PYTHON (run: the interpreter that has the image's jax; default python3),
# KIT_PYTHON (check: a Python 3.12 for the venv; default python3.12), MINITRON_KIT (the wheel
# folder; default REPO/.kit), MINITRON_KIT_SITE (run's install folder; default a temporary one).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
here="$repo/experiments/benchmarks"
kit=${MINITRON_KIT:-$repo/.kit}
limit_mib=64

mib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }

fetch() {
  local python=${PYTHON:-python3}
  rm -rf "$kit" && mkdir -p "$kit"
  local platforms=(--platform manylinux2014_x86_64)
  for n in $(seq 17 39); do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
  local requirement
  while read -r requirement; do
    case "$requirement" in '' | '#'*) continue ;; esac
    if ! "$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --abi cp312 --abi abi3 --abi none "${platforms[@]}" \
        -d "$kit" "$requirement" 2>/dev/null; then
      # An sdist only (promise): pure Python, so a wheel built here installs there.
      "$python" -m pip wheel -q --no-deps -w "$kit" "$requirement"
    fi
  done < "$here/gpu_kit.txt"
  local wheels kit_bytes tree_bytes
  wheels=$(ls "$kit"/*.whl | wc -l)
  kit_bytes=$(cat "$kit"/*.whl | wc -c)
  # What travels besides the kit: tracked files and untracked ones git does not ignore.
  tree_bytes=$(cd "$repo" && git ls-files -z --cached --others --exclude-standard \
    | xargs -0 -r cat 2>/dev/null | wc -c)
  echo "gpu_kit: $wheels wheels, $(mib "$kit_bytes") MiB in $kit; with the repo's" \
       "$(mib "$tree_bytes") MiB: $(mib $((kit_bytes + tree_bytes))) MiB of the $limit_mib that travel"
  if (( kit_bytes + tree_bytes > limit_mib * 1048576 )); then
    echo "gpu_kit: the kit and the repo are over $limit_mib MiB: they cannot travel" >&2
    exit 1
  fi
}

run() {
  local python=${PYTHON:-python3}
  if ! compgen -G "$kit/*.whl" > /dev/null; then
    echo "gpu_kit: no wheels in $kit: run 'bash experiments/benchmarks/gpu_kit.sh fetch' where" \
         "PyPI is reachable, and carry .kit with the repo" >&2
    exit 2
  fi
  local site=${MINITRON_KIT_SITE:-$(mktemp -d -t minitron_kit.XXXXXX)}
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" "$kit"/*.whl
  export PYTHONPATH="$site:$repo${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
  local output=()
  if [ -n "${OUT:-}" ]; then output=(--output="$OUT/gpu_suite.json" --benchmarks_md=); fi
  exec "$python" "$here/gpu_suite.py" "${output[@]}" "$@"
}

check() {
  local python=${KIT_PYTHON:-python3.12} venv="$repo/.venv-gpu-image" started=$SECONDS
  rm -rf "$venv"
  "$python" -m venv "$venv"
  "$venv/bin/pip" install -q -r "$here/gpu_image.txt"
  PYTHON="$venv/bin/python" fetch
  local out
  out=$(mktemp -d -t gpu_kit_check.XXXXXX)
  # Nothing cached from another run: the stdlib corpus is prepared afresh, as on that machine.
  MINITRON_DATA_DIR="$out/tfds" OUT="$out" PYTHON="$venv/bin/python" XLA_FLAGS= \
    MINITRON_KIT_SITE="$out/site" bash "${BASH_SOURCE[0]}" run --smoke "$@"
  echo "gpu_kit: check passed on jax $("$venv/bin/python" -c 'import jax; print(jax.__version__)')" \
       "in $((SECONDS - started)) s; $out/gpu_suite.json"
}

case "${1:-}" in
  fetch) shift; fetch ;;
  run) shift; run "$@" ;;
  check) shift; check "$@" ;;
  *) echo "usage: $0 fetch | run [gpu_suite.py flags] | check" >&2; exit 2 ;;
esac
