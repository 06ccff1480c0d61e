#!/bin/sh
# Entrypoint of the KServe door image (deploy/kserve/Dockerfile).
#   no arguments            -> the image's CMD (python -m handler.doors.kserve_door ... with $MODEL_NAME)
#   arguments that are flags -> python -m handler.doors.kserve_door <those flags>: the way a KServe custom
#                              predictor passes them (containers[0].args: [--model_name=..., ...])
#   any other command       -> run as given (e.g. `sh` or `python -c ...` for debugging)
set -eu
case "${1:-}" in
  -*) exec python -m handler.doors.kserve_door "$@" ;;
  "") echo "kserve-door: no command; pass door flags (--model_name NAME ...) or a command" >&2; exit 64 ;;
  *) exec "$@" ;;
esac
