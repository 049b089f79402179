//! The web app's build, in four steps: cargo compiles the app to wasm32, wasm-bindgen (the
//! workspace's `xtask/bindgen`) writes its JavaScript glue, `wasm-opt -Oz` shrinks it (release
//! builds only), and `dist/` receives every file under a content-hashed name, with
//! `web/index.html` pointing at them and a small start module that loads the app (no inline
//! script: the page needs no exception in the server's Content-Security-Policy).

use std::{
    hash::Hasher,
    path::{Path, PathBuf},
    process::Command,
};

use crate::tools::{self, Output, cmd, workspace_root};

/// How the app is built.
#[derive(Clone, Copy, Debug)]
pub struct Profile {
    /// The cargo profile (`Cargo.toml`).
    cargo: &'static str,
    /// Whether `wasm-opt -Oz` runs.
    optimise: bool,
    /// Under `target/`, where cargo builds it: `run` builds the app beside the server, whose
    /// build holds `target/`'s lock.
    target_subdir: Option<&'static str>,
}

impl Profile {
    /// Whether this build needs `wasm-opt`.
    pub fn optimises(self) -> bool {
        self.optimise
    }

    fn target_dir(self) -> PathBuf {
        let target = workspace_root().join("target");
        match self.target_subdir {
            Some(subdir) => target.join(subdir),
            None => target,
        }
    }
}

/// For running locally: quick to build, a few hundred KiB bigger (no LTO, no `wasm-opt`).
pub const LOCAL: Profile = Profile {
    cargo: "web-local",
    optimise: false,
    target_subdir: Some("web-local"),
};

/// For shipping: small over fast. CI measures the bundle budget on this build.
pub const RELEASE: Profile = Profile {
    cargo: "wasm-release",
    optimise: true,
    target_subdir: None,
};

const PACKAGE: &str = "wadi-web";

/// `cargo build` of the app's wasm; the caller may add environment (clippy).
pub fn compile_command(profile: Profile) -> Command {
    let mut command = cmd(
        "cargo",
        &[
            "build",
            "--target",
            "wasm32-unknown-unknown",
            "--profile",
            profile.cargo,
            "-p",
            PACKAGE,
            "--bin",
            PACKAGE,
        ],
    );
    command
        .current_dir(workspace_root())
        .env("CARGO_TARGET_DIR", profile.target_dir());
    command
}

/// The workspace's wasm-bindgen (`xtask/bindgen`), as cargo built it into `target/<dir>`
/// (`debug` for the dev profile, else the profile's name).
pub fn bindgen_binary(dir: &str) -> PathBuf {
    workspace_root().join("target").join(dir).join(BINDGEN)
}

/// The package of the workspace's wasm-bindgen, for `cargo build -p`.
pub const BINDGEN: &str = "xtask-bindgen";

/// Compiles the app and its wasm-bindgen, and writes `dist/`. (`run` builds the same wasm-bindgen
/// together with the server, so cargo unifies its dependencies' features differently: the first
/// build here after a `run` compiles some of them again.)
pub fn build(profile: Profile, out: &Output) -> Result<(), String> {
    out.run(
        cmd("cargo", &["build", "--profile", "local", "-p", BINDGEN]).current_dir(workspace_root()),
    )?;
    out.run(&mut compile_command(profile))?;
    package(profile, &bindgen_binary("local"), out)
}

/// Writes `dist/` from the wasm that [`compile_command`] built, with `bindgen` (see
/// [`bindgen_binary`]).
pub fn package(profile: Profile, bindgen: &Path, out: &Output) -> Result<(), String> {
    let target_dir = profile.target_dir();
    let wasm = target_dir
        .join("wasm32-unknown-unknown")
        .join(profile.cargo)
        .join(format!("{PACKAGE}.wasm"));
    let staging = target_dir.join("wasm-bindgen").join(profile.cargo);
    let _ = std::fs::remove_dir_all(&staging);
    out.run(Command::new(bindgen).arg(&wasm).arg(&staging).arg(PACKAGE))?;
    let glue = staging.join(format!("{PACKAGE}.js"));
    let mut module = staging.join(format!("{PACKAGE}_bg.wasm"));
    if profile.optimise {
        let optimised = staging.join(format!("{PACKAGE}_bg.opt.wasm"));
        let mut wasm_opt = cmd("wasm-opt", &["-Oz", "--output"]);
        wasm_opt
            .arg(&optimised)
            .arg(&module)
            .env("PATH", tools::path_with_tools());
        out.run(&mut wasm_opt)?;
        module = optimised;
    }
    write_dist(&glue, &module, &staging.join("snippets"))
}

/// `dist/`, replaced whole: the app's two files and `public/`'s, each named after its content,
/// the JavaScript snippets of crates that bring their own (as wasm-bindgen wrote them: the glue
/// imports them by relative path), and the page.
fn write_dist(glue: &Path, module: &Path, snippets: &Path) -> Result<(), String> {
    let root = workspace_root();
    let dist = root.join("dist");
    // Beside `dist/`, not in `target/`: `target/` may be another file system (a container
    // build's cache mount), which a rename cannot cross.
    let (next, old) = (root.join("dist.new"), root.join("dist.old"));
    for leftover in [&next, &old] {
        let _ = std::fs::remove_dir_all(leftover);
    }
    create_dir(&next)?;

    let mut page = read(&root.join("web").join("index.html"))?;
    for path in files_in(&root.join("public"))? {
        let name = file_name(&path);
        let reference = format!("\"/{name}\"");
        if !page.contains(&reference) {
            return Err(format!(
                "web/index.html does not refer to public/{name} as {reference}: each file of \
                 public/ is served under a content-hashed name, which the page must point at"
            ));
        }
        let bytes = read_bytes(&path)?;
        let hashed = hashed_name(&name, content_hash(&[&bytes]));
        write(&next.join(&hashed), &bytes)?;
        page = page.replace(&reference, &format!("\"/{hashed}\""));
    }

    let (glue, module) = (read_bytes(glue)?, read_bytes(module)?);
    let hash = content_hash(&[&glue, &module]);
    let glue_name = format!("{PACKAGE}-{hash}.js");
    let module_name = format!("{PACKAGE}-{hash}_bg.wasm");
    let start_name = format!("start-{hash}.js");
    write(&next.join(&glue_name), &glue)?;
    write(&next.join(&module_name), &module)?;
    write(
        &next.join(&start_name),
        start_script(&glue_name, &module_name).as_bytes(),
    )?;
    if snippets.is_dir() {
        copy_tree(snippets, &next.join("snippets"))?;
    }
    let page = with_loader(&page, &glue_name, &module_name, &start_name)?;
    write(&next.join("index.html"), page.as_bytes())?;

    // The old build goes aside first, so a failed swap never leaves no `dist/` at all.
    let rename = |from: &Path, to: &Path| {
        std::fs::rename(from, to)
            .map_err(|e| format!("cannot move {} to {}: {e}", from.display(), to.display()))
    };
    if dist.exists() {
        rename(&dist, &old)?;
    }
    rename(&next, &dist)?;
    let _ = std::fs::remove_dir_all(&old);
    println!("  web app written to {}", dist.display());
    Ok(())
}

/// The module that starts the app: a file, not an inline script, so the page needs no exception
/// in the server's Content-Security-Policy.
fn start_script(glue: &str, module: &str) -> String {
    format!("import init from \"/{glue}\";\ninit({{ module_or_path: \"/{module}\" }});\n")
}

/// The page with the app's loading at the end of its head: preloads for both of its files, which
/// the start module then asks for.
fn with_loader(page: &str, glue: &str, module: &str, start: &str) -> Result<String, String> {
    if !page.contains("</head>") {
        return Err("web/index.html has no </head> to put the app's loader before".to_owned());
    }
    let loader = format!(
        "  <link rel=\"modulepreload\" href=\"/{glue}\" />\n    \
         <link rel=\"preload\" href=\"/{module}\" as=\"fetch\" type=\"application/wasm\" \
         crossorigin=\"anonymous\" />\n    \
         <script type=\"module\" src=\"/{start}\"></script>\n  </head>"
    );
    Ok(page.replacen("</head>", &loader, 1))
}

/// `name` with `-<hash>` before its first dot, where the server looks for it (`is_hashed` in
/// `server/src/http/static_files.rs`): `style.css` → `style-0123456789abcdef.css`.
fn hashed_name(name: &str, hash: String) -> String {
    match name.split_once('.') {
        Some((stem, extension)) => format!("{stem}-{hash}.{extension}"),
        None => format!("{name}-{hash}"),
    }
}

/// 16 hex digits that change when any of the contents does (cache busting, not security).
fn content_hash(contents: &[&[u8]]) -> String {
    let mut hasher = std::hash::DefaultHasher::new();
    for content in contents {
        hasher.write(content);
    }
    format!("{:016x}", hasher.finish())
}

fn copy_tree(from: &Path, to: &Path) -> Result<(), String> {
    create_dir(to)?;
    for path in files_in(from)? {
        let target = to.join(file_name(&path));
        if path.is_dir() {
            copy_tree(&path, &target)?;
        } else {
            crate::copy(&path, &target)?;
        }
    }
    Ok(())
}

/// The entries of `dir`, sorted.
fn files_in(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let cannot = |e: std::io::Error| format!("cannot read {}: {e}", dir.display());
    let mut paths = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(cannot)? {
        paths.push(entry.map_err(cannot)?.path());
    }
    paths.sort();
    Ok(paths)
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned()
}

fn read(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

fn read_bytes(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

fn write(path: &Path, bytes: &[u8]) -> Result<(), String> {
    std::fs::write(path, bytes).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

fn create_dir(path: &Path) -> Result<(), String> {
    std::fs::create_dir_all(path).map_err(|e| format!("cannot create {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashed_names_keep_the_extension_the_server_recognises() {
        assert_eq!(
            hashed_name("style.css", "0123456789abcdef".to_owned()),
            "style-0123456789abcdef.css"
        );
        assert_eq!(
            hashed_name("app.min.js", "0123456789abcdef".to_owned()),
            "app-0123456789abcdef.min.js"
        );
        assert_eq!(content_hash(&[b"a", b"b"]).len(), 16);
        assert_ne!(content_hash(&[b"a"]), content_hash(&[b"b"]));
    }

    #[test]
    fn the_loader_goes_at_the_end_of_the_head() {
        let page = "<html>\n  <head>\n    <title>t</title>\n  </head>\n  <body></body>\n</html>\n";
        let page = with_loader(page, "app-1.js", "app-1_bg.wasm", "start-1.js").expect("a head");
        let loader = page
            .find("<script type=\"module\" src=\"/start-1.js\"></script>")
            .expect("the loader");
        assert!(page.find("<title>").expect("title") < loader);
        assert!(loader < page.find("</head>").expect("head end"));
        assert!(page.contains("<link rel=\"modulepreload\" href=\"/app-1.js\" />"));
        assert!(with_loader("<html></html>", "a.js", "a.wasm", "s.js").is_err());
        let start = start_script("app-1.js", "app-1_bg.wasm");
        assert!(start.starts_with("import init from \"/app-1.js\";"));
        assert!(start.contains("module_or_path: \"/app-1_bg.wasm\""));
    }
}
