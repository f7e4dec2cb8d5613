#!/usr/bin/env bash
# System packages the tests need: Debian's chromium (the browser test, tests/e2e/test_ui.py) and
# Debian's postgresql (the catalogue's embedded server: initdb and pg_ctl under
# /usr/lib/postgresql/<version>/bin, plus the `postgres` user the server runs as under root).
# Called by .ci/run before the tests; installs only what is missing, with one `apt-get update`.
set -euo pipefail
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || missing+=(postgresql)
if [ "${#missing[@]}" -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
chromium --version
ls -d /usr/lib/postgresql/*/bin/initdb
