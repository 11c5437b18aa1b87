#!/usr/bin/env bash
# The main job: sets a fresh Debian 12 machine up (idempotent), brings up the three-host lab and
# runs the ftvm demo in it, printing the measured figures.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec pnpm -s demo "$@"
