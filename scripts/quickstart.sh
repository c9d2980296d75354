#!/usr/bin/env bash
# One command from a fresh clone to a real run: install OpenSSH server/client and
# rsync (Debian/Ubuntu, when run as root or with sudo), install remote-exec with its
# test extras, then run the demo through a throwaway sshd on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v rsync >/dev/null || need+=(rsync)
command -v ssh >/dev/null || need+=(openssh-client)
[ -x /usr/sbin/sshd ] || command -v sshd >/dev/null || need+=(openssh-server)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  echo "installing ${need[*]} ..."
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
python3 -m pip install -q -e '.[test]'
exec remote-exec demo
