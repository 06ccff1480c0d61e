#!/usr/bin/env bash
# Serve the shipped models: set up, build model_store/{efficientnet_lite0,shapes}.mar if missing or
# stale, start TorchServe, wait until every model has a READY worker, print the endpoints and an
# example call on a real photo.
#   ./scripts/serve.sh          start
#   ./scripts/serve.sh stop     stop
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv"
export PATH="$VENV/bin:$PATH"

if [[ "${1:-}" == "stop" ]]; then
  exec "$VENV/bin/torchserve" --stop
fi

bash "$ROOT/scripts/setup.sh"
# (Re)build the archives when one is missing or older than the handler or the models.
stale=0
for mar in model_store/efficientnet_lite0.mar model_store/shapes.mar; do
  if [[ ! -f "$mar" ]] || [[ -n "$(find handler models -newer "$mar" -print -quit)" ]]; then
    stale=1
  fi
done
if [[ "$stale" == 1 ]]; then
  "$VENV/bin/python" scripts/build_mar.py
fi

mkdir -p logs
LOG_LOCATION="$ROOT/logs" METRICS_LOCATION="$ROOT/logs" \
  "$VENV/bin/torchserve" --start --ncs --ts-config config.properties --model-store model_store \
  >logs/serve.out 2>&1

# key_file.json is written by TorchServe into the directory it was started in.
"$VENV/bin/python" - <<'PY'
import json, sys, time, urllib.request
from pathlib import Path

deadline = time.time() + 180
MODELS = ("efficientnet_lite0", "shapes")
status = "not registered"
while time.time() < deadline:
    key = Path("key_file.json")
    if key.is_file():
        try:
            management = json.loads(key.read_text())["management"]["key"]
            states = []
            for model in MODELS:
                req = urllib.request.Request(f"http://127.0.0.1:8081/models/{model}",
                                             headers={"Authorization": f"Bearer {management}"})
                workers = json.loads(urllib.request.urlopen(req, timeout=5).read())[0]["workers"]
                states.append(any(w["status"] == "READY" for w in workers))
                status = f"{model}: " + (",".join(w["status"] for w in workers) or "no workers")
            if all(states):
                break
        except Exception as exc:  # the frontend is still starting
            status = type(exc).__name__
    time.sleep(1)
else:
    sys.exit(f"serve: the models did not become READY in 180 s (last status: {status}); see logs/")
inference = json.loads(Path("key_file.json").read_text())["inference"]["key"]
print(f"""
TorchServe is serving (workers READY):
  efficientnet_lite0  ImageNet-1k, 1000 classes   http://127.0.0.1:8080/predictions/efficientnet_lite0
  shapes              the small demo model         http://127.0.0.1:8080/predictions/shapes
  management  http://127.0.0.1:8081/models
  metrics     http://127.0.0.1:8082/metrics   (Prometheus, no token)
Token keys: {Path('key_file.json').resolve()} ("inference", "management")

Example (a photo of a cat in, the top-5 ImageNet labels out):
  curl -H "Authorization: Bearer {inference}" -T {Path("tests/data/cat.jpg").resolve()} http://127.0.0.1:8080/predictions/efficientnet_lite0

Stop with: ./scripts/serve.sh stop
""")
PY
