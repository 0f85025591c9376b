#!/usr/bin/env bash
# Install everything the tests need and run all of them (slow ones included).
#   - Debian packages for the real servers the tests start on 127.0.0.1
#   - a virtual environment in .venv with the bot and its test dependencies
# Extra arguments go to pytest, e.g.  bash tests/run.sh -m "not slow" -x  (-n 0: one process)
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES="ngircd inspircd anope prosody lua-unbound openssl rsync openssh-server openssh-client gnupg gpgv dovecot-imapd swaks"
missing=""
for p in $PACKAGES; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
  echo "installing Debian packages:$missing"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
# Two workers: most of the suite waits on real servers and processes, not on the CPU
# (258 s in one process, ~140 s in two, on 2 cores). Pass -n 0 to run in one process.
exec .venv/bin/python -m pytest -q -n 2 "$@"
