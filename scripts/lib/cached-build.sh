# Shared by the cached builds (packages/kvmclock/qemu/build.sh, vagrant/box/build.sh): a step's
# output goes to the build log only; a failed step keeps the log as <cache>/<hash>.failed.log and
# shows its tail. Source it after setting build_log, cache, hash and defining log().
fail() {
  cp "$build_log" "$cache/$hash.failed.log" 2>/dev/null || true
  log "error: $*"
  log "last lines of the log ($cache/$hash.failed.log):"
  tail -n 30 "$build_log" >&2 || true
  exit 1
}
run() { # run a step, output to the log only
  echo "== $*" >>"$build_log"
  "$@" >>"$build_log" 2>&1 || fail "step failed: $*"
}
