//! `xtask-bindgen <input.wasm> <out-dir> <out-name>`: what the web build needs of wasm-bindgen's
//! command line (`wasm-bindgen --target web --no-typescript`), from the library that command
//! line wraps.
//!
//! A workspace crate instead of `cargo install wasm-bindgen-cli`: it compiles with the rest of
//! the build, sharing its dependencies, and without the command line's test runner (an HTTP
//! server and client), which took most of that install's minutes.

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [input, out_dir, out_name] = args.as_slice() else {
        eprintln!("usage: xtask-bindgen <input.wasm> <out-dir> <out-name>");
        return ExitCode::from(2);
    };
    let generated = wasm_bindgen_cli_support::Bindgen::new()
        .input_path(input)
        .web(true)
        .and_then(|bindgen| {
            bindgen
                .typescript(false)
                // As the command line does by default: the glue keeps its fallback path to the
                // module (the start module passes the path anyway).
                .omit_default_module_path(false)
                .out_name(out_name)
                .generate(out_dir)
        });
    match generated {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("xtask-bindgen: {error:#}");
            ExitCode::FAILURE
        }
    }
}
