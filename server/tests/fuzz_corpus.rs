//! The fuzz targets' committed corpus (`fuzz/corpus/<target>/`), replayed as an ordinary test
//! on every CI run: every input the fuzzers kept, and every crash they ever found (saved there
//! after the fix), must pass through its target without a panic.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

#[test]
fn every_corpus_input_passes_its_target() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("fuzz")
        .join("corpus");
    let mut replayed = 0;
    for (name, target) in wadi_server::fuzzing::TARGETS {
        let dir = root.join(name);
        let entries = std::fs::read_dir(&dir)
            .unwrap_or_else(|error| panic!("no corpus for {name} in {}: {error}", dir.display()));
        let mut count = 0;
        for entry in entries {
            let path = entry.unwrap().path();
            if path.is_file() {
                let input = std::fs::read(&path).unwrap();
                target(&input);
                count += 1;
            }
        }
        assert!(count > 0, "the {name} corpus is empty");
        replayed += count;
    }
    eprintln!("replayed {replayed} corpus inputs");
}
