#!/usr/bin/env bash
# Idempotent set-up: a .venv with the pinned requirements, and Java 11+ for TorchServe's frontend.
#   scripts/setup.sh           what serving and the tests need
#   scripts/setup.sh --bench   plus the benchmarks' extras (requirements-bench.txt)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"

java_major() {
  # Prints the major version of the java on PATH, or nothing.
  command -v java >/dev/null 2>&1 || return 0
  java -version 2>&1 | awk -F'"' '/version/ {split($2, v, "."); print (v[1] == "1" ? v[2] : v[1]); exit}'
}

ensure_java() {
  local major
  major="$(java_major)"
  if [[ -n "$major" && "$major" -ge 11 ]]; then
    return 0
  fi
  if [[ "$(id -u)" == "0" ]] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: Java 11+ not found; installing openjdk-17-jre-headless" >&2
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openjdk-17-jre-headless >/dev/null
    major="$(java_major)"
    [[ -n "$major" && "$major" -ge 11 ]] && return 0
  fi
  echo "setup: TorchServe needs Java 11 or newer on PATH (found: ${major:-none})." >&2
  echo "setup: install it, e.g. 'sudo apt-get install openjdk-17-jre-headless', then run again." >&2
  exit 1
}

# torch's CUDA build takes ~5.6 GB in the venv; pip needs room beyond that while it unpacks.
NEED_MB="${NEED_MB:-7000}"

ensure_disk() {
  # A full disk makes pip fail halfway with "OSError: [Errno 28]" and leaves a broken venv:
  # say so up front. Only checked when torch still has to be installed.
  "$VENV/bin/python" -c "import torch" 2>/dev/null && return 0
  local free_mb
  free_mb="$(df -Pm "$ROOT" | awk 'NR == 2 {print $4}')"
  if [[ -n "$free_mb" && "$free_mb" -lt "$NEED_MB" ]]; then
    echo "setup: only ${free_mb} MB free under $ROOT; installing torch needs about ${NEED_MB} MB." >&2
    echo "setup: free some disk space (or set NEED_MB=0 to try anyway), then run again." >&2
    exit 1
  fi
}

ensure_venv() {
  if [[ ! -x "$VENV/bin/python" ]]; then
    echo "setup: creating $VENV" >&2
    "$PY" -m venv "$VENV"
  fi
  # A stamp of the requirements file skips pip when nothing changed (pip itself takes seconds).
  local stamp="$VENV/.requirements.sha256"
  local want
  want="$(sha256sum "$ROOT/requirements.txt" | cut -d' ' -f1)"
  if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    return 0
  fi
  ensure_disk
  echo "setup: installing requirements (torch is large; first run takes minutes)" >&2
  # --no-cache-dir: a cached copy of the wheels would cost gigabytes more on a fresh machine.
  "$VENV/bin/python" -m pip install --quiet --no-cache-dir --upgrade pip
  "$VENV/bin/python" -m pip install --quiet --no-cache-dir -r "$ROOT/requirements.txt"
  echo "$want" >"$stamp"
}

ensure_project() {
  # This checkout's handler package, installed editable: scripts and tests import it from any
  # directory without editing the import path. Skipped while pyproject.toml is unchanged and
  # ``handler`` still resolves here (-I: not from the current directory).
  local stamp="$VENV/.project.sha256"
  local want origin
  want="$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)"
  origin="$("$VENV/bin/python" -I -c 'import importlib.util as u, os; s = u.find_spec("handler")
print(os.path.realpath(s.origin) if s and s.origin else "")' 2>/dev/null || true)"
  if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" && "$origin" == "$(cd "$ROOT" && pwd -P)/handler/__init__.py" ]]; then
    return 0
  fi
  echo "setup: installing this project (editable)" >&2
  # Build isolation (pip's default) fetches setuptools for the build: a venv on Python 3.12+ has none.
  # setuptools' warning that ./handler shadows the installed package is moot: it is the same folder.
  PYTHONWARNINGS="ignore:Editable installation" \
    "$VENV/bin/python" -m pip install --quiet --no-cache-dir --no-deps -e "$ROOT"
  echo "$want" >"$stamp"
}

ensure_bench_extras() {
  # Benchmarks only: scikit-image ships the real photos they use.
  "$VENV/bin/python" -c "import skimage, captum" 2>/dev/null && return 0
  echo "setup: installing benchmark extras" >&2
  "$VENV/bin/python" -m pip install --quiet -r "$ROOT/requirements-bench.txt"
}

ensure_java
ensure_venv
ensure_project
if [[ "${1:-}" == "--bench" ]]; then
  ensure_bench_extras
fi
echo "setup: ok ($("$VENV/bin/python" -c 'import torch, torchvision, ts; print("torch", torch.__version__, "torchvision", torchvision.__version__)'))" >&2
