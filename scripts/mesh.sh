#!/usr/bin/env bash
# A local mesh of coordinators on embedded defaults (bundled Redis, data under ./var/).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
. .venv/bin/activate
export PYTHONUNBUFFERED=true
exec honcho start -f Procfile "$@"
