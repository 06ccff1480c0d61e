#!/usr/bin/env bash
# Serve the demo model: set up, build model_store/shapes.mar if missing, start TorchServe, wait
# until the model has a READY worker, print the endpoints and an example call.
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
# (Re)build the archive when it is missing or older than the handler or the demo model.
if [[ ! -f model_store/shapes.mar ]] || [[ -n "$(find handler models/shapes -newer model_store/shapes.mar -print -quit)" ]]; then
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
status = "not registered"
while time.time() < deadline:
    key = Path("key_file.json")
    if key.is_file():
        try:
            management = json.loads(key.read_text())["management"]["key"]
            req = urllib.request.Request("http://127.0.0.1:8081/models/shapes",
                                         headers={"Authorization": f"Bearer {management}"})
            workers = json.loads(urllib.request.urlopen(req, timeout=5).read())[0]["workers"]
            status = ",".join(w["status"] for w in workers) or "no workers"
            if any(w["status"] == "READY" for w in workers):
                break
        except Exception as exc:  # the frontend is still starting
            status = type(exc).__name__
    time.sleep(1)
else:
    sys.exit(f"serve: the model did not become READY in 180 s (last status: {status}); see logs/")
inference = json.loads(Path("key_file.json").read_text())["inference"]["key"]
print(f"""
TorchServe is serving model 'shapes' (worker READY).
  inference   http://127.0.0.1:8080/predictions/shapes
  management  http://127.0.0.1:8081/models/shapes
  metrics     http://127.0.0.1:8082/metrics   (Prometheus, no token)
Token keys: {Path('key_file.json').resolve()} ("inference", "management")

Example (one image in, {{label: score}} out):
  .venv/bin/python scripts/make_example_image.py circle /tmp/circle.png
  curl -H "Authorization: Bearer {inference}" -T /tmp/circle.png http://127.0.0.1:8080/predictions/shapes

Stop with: ./scripts/serve.sh stop
""")
PY
