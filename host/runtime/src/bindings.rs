//! Host-side bindings generated from the repository's `wit/`: the current interface (0.2.0) and
//! the one before it (0.1.0, in `wit/deps`), both linked so that components built against
//! either load.

pub(crate) mod connector {
    wasmtime::component::bindgen!({
        path: "../../wit",
        world: "starling:plugin/connector@0.2.0",
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
        world: "starling:plugin/enricher@0.2.0",
        exports: { default: async },
        with: {
            "starling:plugin/types@0.2.0": super::connector::starling::plugin0_2_0::types,
            "starling:plugin/log@0.2.0": super::connector::starling::plugin0_2_0::log,
            "starling:plugin/config@0.2.0": super::connector::starling::plugin0_2_0::config,
        },
    });
}

/// `starling:plugin@0.1.0`, for components built before 0.2.0.
pub(crate) mod v1 {
    pub(crate) mod connector {
        wasmtime::component::bindgen!({
            path: "../../wit",
            world: "starling:plugin/connector@0.1.0",
            exports: { default: async },
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
                "starling:plugin/types@0.1.0": super::connector::starling::plugin0_1_0::types,
                "starling:plugin/log@0.1.0": super::connector::starling::plugin0_1_0::log,
                "starling:plugin/config@0.1.0": super::connector::starling::plugin0_1_0::config,
            },
        });
    }

    pub(crate) use connector::starling::plugin0_1_0::types;
}

pub use connector::starling::plugin0_2_0::types;
