//! Helpers for the agent's unit tests.

/// Compares `got` with the golden file `src/testdata/<name>`; with
/// `GANTRY_BLESS=1` in the environment, writes it first.
pub fn golden(name: &str, got: &str) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("src/testdata")
        .join(name);
    if std::env::var_os("GANTRY_BLESS").is_some() {
        std::fs::write(&path, got).expect("write the golden file");
    }
    let want = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (run with GANTRY_BLESS=1 to create)",
            path.display()
        )
    });
    assert_eq!(got, want, "output differs from {}", path.display());
}
