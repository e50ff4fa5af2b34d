#!/usr/bin/env bash
# Sets up a machine to run egressd and its tests: system tools (when root and
# missing: curl, openssl, iproute2, util-linux, iptables, dig, prometheus/promtool, kubectl, node, jq) and a virtualenv
# in .venv with egressd installed in editable mode.
#   .venv     Python >= 3.12 when one is found (mitmproxy, the tests' oracle, needs it), else python3 (>= 3.11)
#   .venv311  Python 3.11, when present: the oldest Python egressd supports (EGRESSD_PY311=1 to build it)
set -euo pipefail
cd "$(dirname "$0")"

# tool -> the Debian package that has it (the sidecar tests need iptables and dig)
declare -A package=(
  [curl]=curl [openssl]=openssl [ip]=iproute2 [ss]=iproute2 [unshare]=util-linux [prlimit]=util-linux
  [setpriv]=util-linux [iptables-restore]=iptables [ip6tables-restore]=iptables [dig]=bind9-dnsutils
  [prometheus]=prometheus [promtool]=prometheus [kubectl]=kubectl [node]=nodejs [jq]=jq
)
need=()
for tool in "${!package[@]}"; do command -v "$tool" >/dev/null || need+=("${package[$tool]}"); done
if [ ${#need[@]} -gt 0 ]; then
  mapfile -t need < <(printf '%s\n' "${need[@]}" | sort -u)
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq
    # No service may start from a package's install script (prometheus would listen on :9090).
    made_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
      printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && made_policy=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
    [ "$made_policy" = 0 ] || rm -f /usr/sbin/policy-rc.d
  else
    echo "install.sh: missing tools: install the packages ${need[*]}" >&2
    exit 1
  fi
fi

find_python() {  # find_python MIN_MINOR MAX_MINOR: print an interpreter path of 3.MIN..3.MAX
  local minor cand
  for minor in $(seq "$2" -1 "$1"); do
    for cand in "python3.$minor" "$HOME"/.pyenv/versions/3."$minor".*/bin/python3."$minor" /usr/bin/python3."$minor"; do
      if "$cand" -c "import sys; assert sys.version_info[:2] == (3, $minor)" >/dev/null 2>&1; then
        command -v "$cand" 2>/dev/null || echo "$cand"
        return 0
      fi
    done
  done
  return 1
}

make_venv() {  # make_venv DIR PYTHON EXTRAS
  if [ ! -x "$1/bin/python" ]; then
    "$2" -m venv "$1"
  fi
  "$1/bin/python" -m pip install -q --disable-pip-version-check -e ".[$3]"
}

py=$(find_python 12 13 || find_python 11 11 || true)
if [ -z "$py" ]; then
  echo "install.sh: no Python 3.11+ found" >&2
  exit 1
fi
make_venv .venv "$py" test
echo "install.sh: .venv ready ($("$py" --version))"
if [ "${EGRESSD_PY311:-0}" = 1 ] && py311=$(find_python 11 11); then
  make_venv .venv311 "$py311" test
  echo "install.sh: .venv311 ready ($("$py311" --version))"
fi
