//! Embeds the SQL migrations (`migrations/{sqlite,postgres}/NNNN_name.sql`)
//! into the controller: writes `$OUT_DIR/migrations.rs` with one
//! `(version, description, sql)` entry per file, read the way
//! `sqlx::migrate!` reads them (version before the first `_`, the rest
//! less `.sql` with `_` as spaces). Doing it here rather than with that
//! macro spares every build sqlx's compile-time drivers (a second build
//! of sqlx-core, -postgres and -sqlite for the macro).

use std::fmt::Write as _;
use std::path::Path;

fn main() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
    println!("cargo:rerun-if-changed={}", dir.display());
    let mut out = String::new();
    for backend in ["sqlite", "postgres"] {
        let sub = dir.join(backend);
        println!("cargo:rerun-if-changed={}", sub.display());
        let mut files: Vec<_> = std::fs::read_dir(&sub)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", sub.display()))
            .map(|e| e.expect("a migration directory entry").path())
            .filter(|p| p.extension().is_some_and(|x| x == "sql"))
            .collect();
        files.sort();
        writeln!(
            out,
            "pub const {}: &[(i64, &str, &str)] = &[",
            backend.to_uppercase()
        )
        .unwrap();
        for path in files {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            let (version, rest) = name
                .split_once('_')
                .unwrap_or_else(|| panic!("migration {name}: expected NNNN_name.sql"));
            let version: i64 = version
                .parse()
                .unwrap_or_else(|_| panic!("migration {name}: the version is not a number"));
            assert!(
                !rest.ends_with(".up.sql") && !rest.ends_with(".down.sql"),
                "migration {name}: reversible migrations are not used here"
            );
            let description = rest.trim_end_matches(".sql").replace('_', " ");
            writeln!(
                out,
                "    ({version}, {description:?}, include_str!({:?})),",
                path.display().to_string()
            )
            .unwrap();
        }
        writeln!(out, "];").unwrap();
    }
    let dest = Path::new(&std::env::var("OUT_DIR").expect("OUT_DIR")).join("migrations.rs");
    std::fs::write(&dest, out).unwrap_or_else(|e| panic!("cannot write {}: {e}", dest.display()));
}
