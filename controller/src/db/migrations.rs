//! The embedded SQL migrations, as `sqlx` migrators. `build.rs` lists the
//! files of `migrations/sqlite` and `migrations/postgres`; each becomes a
//! simple (not reversible) migration checksummed at start-up exactly as
//! `sqlx::migrate!` checksums it (SHA-384 of the file), so databases
//! migrated by earlier builds see the same versions and checksums.

use sqlx::error::BoxDynError;
use sqlx::migrate::{MigrateError, Migration, MigrationSource, MigrationType, Migrator};
use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/migrations.rs"));
}

/// One backend's migrations as `build.rs` embedded them.
#[derive(Debug)]
struct Embedded(&'static [(i64, &'static str, &'static str)]);

impl MigrationSource<'static> for Embedded {
    fn resolve(
        self,
    ) -> Pin<Box<dyn Future<Output = Result<Vec<Migration>, BoxDynError>> + Send + 'static>> {
        let migrations = self
            .0
            .iter()
            .map(|&(version, description, sql)| {
                Migration::new(
                    version,
                    Cow::Borrowed(description),
                    MigrationType::Simple,
                    Cow::Borrowed(sql),
                    sql.starts_with("-- no-transaction"),
                )
            })
            .collect();
        Box::pin(std::future::ready(Ok(migrations)))
    }
}

/// The migrator of SQLite databases.
pub async fn sqlite() -> Result<Migrator, MigrateError> {
    Migrator::new(Embedded(embedded::SQLITE)).await
}

/// The migrator of PostgreSQL databases.
pub async fn postgres() -> Result<Migrator, MigrateError> {
    Migrator::new(Embedded(embedded::POSTGRES)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every file of each directory is embedded, in version order, with
    /// the description `sqlx::migrate!` gave it (what earlier builds wrote
    /// into `_sqlx_migrations`).
    #[tokio::test]
    async fn every_migration_file_is_embedded_in_order() {
        for (dir, m) in [("sqlite", sqlite().await), ("postgres", postgres().await)] {
            let m = m.unwrap();
            let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("migrations")
                .join(dir);
            let mut names: Vec<String> = std::fs::read_dir(&path)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".sql"))
                .collect();
            names.sort();
            let migs: Vec<_> = m.iter().collect();
            assert_eq!(migs.len(), names.len(), "{dir}");
            assert!(migs.len() >= 19, "{dir}: {} migrations", migs.len());
            assert_eq!(migs[0].description, "initial");
            for (mig, name) in migs.into_iter().zip(&names) {
                let (version, rest) = name.split_once('_').unwrap();
                assert_eq!(mig.version, version.parse::<i64>().unwrap(), "{name}");
                assert_eq!(
                    mig.description,
                    rest.trim_end_matches(".sql").replace('_', " ")
                );
                assert_eq!(mig.migration_type, MigrationType::Simple);
                let sql = std::fs::read_to_string(path.join(name)).unwrap();
                assert_eq!(mig.sql, sql, "{name}");
            }
        }
    }
}
