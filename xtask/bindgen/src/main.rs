//! `xtask-bindgen <input.wasm> <out-dir> <out-name>`: what the web build needs of wasm-bindgen's
//! command line (`wasm-bindgen --target web --no-typescript`), from the library that command
//! line wraps.
//!
//! A workspace crate, so it compiles with the rest of the build, sharing its dependencies, and
//! without the command line's test runner (an HTTP server and client).

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
                // No fallback path to the module in the glue: the module's name in `dist/` is
                // hashed, and the start module passes it.
                .omit_default_module_path(true)
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
