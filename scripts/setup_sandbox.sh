#!/usr/bin/env bash
# Install what the python tool's sandbox needs (glmkit/chat/sandbox.py): bubblewrap, and Debian's
# python3 with ipykernel, matplotlib and numpy, outside any home folder so the sandbox's
# unprivileged user can run it. Idempotent: a second run only checks. Never fails set-up: where
# it cannot install (not root, no apt-get) it says what is missing, and the python tool refuses to
# run until it is there (or runs unsandboxed with --unsafe-python).
set -uo pipefail
packages=(bubblewrap python3 python3-ipykernel python3-matplotlib-inline python3-matplotlib python3-numpy)

have() {
  command -v bwrap >/dev/null && [ -x /usr/bin/python3 ] \
    && /usr/bin/python3 -c "import ipykernel, matplotlib_inline, matplotlib, numpy" 2>/dev/null
}

if have; then
  echo "python tool sandbox: bubblewrap and /usr/bin/python3 with ipykernel are installed"
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "python tool sandbox: NOT installed (needs root and apt-get; install ${packages[*]} by hand)." >&2
  echo "  The python tool refuses to run without it, unless asked to run unsandboxed (--unsafe-python)." >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
if apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends "${packages[@]}" >/dev/null \
    && have; then
  echo "python tool sandbox: installed ${packages[*]}"
else
  echo "python tool sandbox: installing ${packages[*]} failed; the python tool will refuse to run" >&2
fi
exit 0
