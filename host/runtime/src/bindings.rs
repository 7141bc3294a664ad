//! Host-side bindings generated from the repository's `wit/`.

pub(crate) mod connector {
    wasmtime::component::bindgen!({
        path: "../../wit",
        world: "starling:plugin/connector@0.1.0",
        exports: { default: async },
        additional_derives: [PartialEq],
        with: {
            "wasi:io": wasmtime_wasi::p2::bindings::io,
            "wasi:clocks": wasmtime_wasi::p2::bindings::clocks,
            "wasi:random": wasmtime_wasi::p2::bindings::random,
            "wasi:cli": wasmtime_wasi::p2::bindings::cli,
            "wasi:http": wasmtime_wasi_http::p2::bindings::http,
        },
    });
}

pub(crate) mod enricher {
    wasmtime::component::bindgen!({
        path: "../../wit",
        world: "starling:plugin/enricher@0.1.0",
        exports: { default: async },
        with: {
            "starling:plugin/types": super::connector::starling::plugin::types,
            "starling:plugin/log": super::connector::starling::plugin::log,
            "starling:plugin/config": super::connector::starling::plugin::config,
        },
    });
}

pub use connector::starling::plugin::types;
