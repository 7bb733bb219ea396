#!/usr/bin/env bash
# Build interop/target/release/marshal-seed: the Rust seed persister
# (../shared/reference/disk_persister.rs beside the repository, or
# $MARSHAL_SEED_RS) behind a small CLI, for interop/test_interop.py.
# Offline: the crates come from Debian's librust-*-dev packages, installed here
# when missing; cargo from ~/.cargo/bin, else from Debian (cargo-web).
# Prints the binary's path last; exits non-zero on any failure.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
SEED_RS=${MARSHAL_SEED_RS:-$REPO/../shared/reference/disk_persister.rs}
fail() { echo "interop/build.sh: $*" >&2; exit 1; }

[ -r "$SEED_RS" ] || fail "cannot read the Rust seed $SEED_RS (shared/ beside the repository, or set MARSHAL_SEED_RS)"

apt_install() {  # apt_install PACKAGE...: quietly, showing apt's output only if it fails
    local log sudo=()
    [ "$(id -u)" -eq 0 ] || sudo=(sudo -n)
    log=$(mktemp)
    if ! { "${sudo[@]}" apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
            "${sudo[@]}" apt-get install -y -qq "$@"; } >"$log" 2>&1; then
        cat "$log" >&2; rm -f "$log"
        fail "could not install $*"
    fi
    rm -f "$log"
}

crates=(librust-serde-dev librust-serde-derive-dev librust-serde-json-dev librust-log-dev
        librust-notify-debouncer-mini-dev librust-chrono-dev librust-uuid-dev)
missing=()
for package in "${crates[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "interop/build.sh: installing ${missing[*]}" >&2
    apt_install "${missing[@]}"
fi

export PATH="$HOME/.cargo/bin:$PATH"
if ! command -v cargo >/dev/null; then
    # Debian's own toolchain: bookworm's plain rustc (1.63) is too old for the seed.
    echo "interop/build.sh: no cargo on PATH or in ~/.cargo/bin; installing Debian's cargo-web" >&2
    apt_install cargo-web
fi

cd "$HERE"
cargo build --offline --release --target-dir "$HERE/target" || fail "cargo build failed"
binary="$HERE/target/release/marshal-seed"
[ -x "$binary" ] || fail "cargo succeeded but $binary is missing"
echo "$binary"
