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
install_missing() { # the Debian packages named that are not installed yet (apt-get update only if needed)
  local pkg missing=()
  for pkg in "$@"; do
    [[ $(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true) == 'install ok installed' ]] || missing+=("$pkg")
  done
  ((${#missing[@]})) || return 0
  log "installing ${missing[*]}"
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >>"$build_log" 2>&1; then
    run apt-get update -q
    DEBIAN_FRONTEND=noninteractive run apt-get install -y -q --no-install-recommends "${missing[@]}"
  fi
}
