#!/usr/bin/env bash
# System packages the browser test (tests/e2e/test_ui.py) needs: Debian's chromium.
# Called by .ci/run before the tests; does nothing when chromium is already there.
set -euo pipefail
if ! command -v chromium >/dev/null 2>&1; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi
chromium --version
