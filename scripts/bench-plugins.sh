#!/usr/bin/env bash
# Plugin benchmarks (BENCHMARKS.md): the value-tier enricher native, as a Starling component and
# as an Extism plugin, in one run; and a warm start with 10 plugins.
#
#   scripts/bench-plugins.sh             # both
#   scripts/bench-plugins.sh enricher    # or: warm_start
set -euo pipefail
cd "$(dirname "$0")/.."

what=${1:-all}

cargo build --release -p starling-cli
target/release/starling plugin build connectors tests/plugins --out target/bench-plugins
target/release/starling plugin build connectors/value-tier --out target/plugins

if [[ $what == all || $what == enricher ]]; then
    # The Extism plugin is a core module built with the same guest toolchain as the Rust
    # plugins (rustup's wasm32 target if installed, else Debian's Rust with a rebuilt std,
    # which `starling plugin build` above has installed).
    guest=(cargo)
    build_std=()
    guest_env=()
    if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-unknown-unknown; then
        guest=(/usr/bin/cargo)
        build_std=(-Zbuild-std=std,panic_abort)
        guest_env=(PATH="/usr/bin:$PATH" RUSTC=/usr/bin/rustc RUSTC_BOOTSTRAP=1
            CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_LINKER=wasm-ld-19)
    fi
    env "${guest_env[@]}" CARGO_TARGET_DIR="$PWD/target/guest" "${guest[@]}" build --release \
        --target wasm32-unknown-unknown --manifest-path host/bench/extism-value-tier/Cargo.toml "${build_std[@]}"
fi
# One build serves both benches: the Extism side is a feature of the bench crate.
case $what in
    all) cargo bench -p starling-bench --features extism ;;
    enricher) cargo bench -p starling-bench --features extism --bench enricher ;;
    warm_start) cargo bench -p starling-bench --bench warm_start ;;
esac
