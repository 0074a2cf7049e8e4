#!/usr/bin/env bash
# Installs what the build and the tests need when it is missing, then runs the whole suite.
# Safe to run again; needs root (or sudo) only when something must be installed.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v cmake >/dev/null || need+=(cmake)            # Pingora's zlib-ng build
command -v redis-server >/dev/null || need+=(redis-server) # tests start their own
command -v redis-cli >/dev/null || need+=(redis-tools)     # cluster set-up in tests
command -v promtool >/dev/null || need+=(prometheus)       # scrape test, promtool checks
command -v systemd-analyze >/dev/null || need+=(systemd)  # the unit file check
command -v curl >/dev/null || need+=(curl)                 # HTTP/2 and TLS tests
command -v openssl >/dev/null || need+=(openssl)           # self-signed certificates in tests
if [ ${#need[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  echo "installing: ${need[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi

cargo test --workspace --locked "$@"
