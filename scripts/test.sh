#!/usr/bin/env bash
# The test command: sets the machine up (idempotent) and runs every test — unit tests and the
# integration tests on real QEMU guests, libvirtd, sshd and network-namespace lab hosts.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
pnpm -s typecheck   # tests, benches and scripts are strict TypeScript too

results=$(mktemp /tmp/ftvm-vitest-XXXXXX.json)
status=0
pnpm exec vitest run --reporter=default --reporter=json --outputFile.json="$results" "$@" || status=$?
# The lab is torn down by the tests themselves; make sure nothing is left even after a crash.
pnpm -s lab down >/dev/null 2>&1 || true

# One plain closing line a CI reader understands, from vitest's own counts.
node -e '
  const r = JSON.parse(require("fs").readFileSync(process.argv[1], "utf8"));
  const skipped = r.numPendingTests + r.numTodoTests;
  console.log(`tests: ${r.numPassedTests} passed, ${r.numFailedTests} failed, ${skipped} skipped`);
' "$results" || true
rm -f "$results"
exit $status
