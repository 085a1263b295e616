//! The database: one `sqlx::Any` pool over SQLite (default, a file in the
//! state dir) or PostgreSQL (by URL), migrated at start.
//!
//! All SQL is written once, with `$1` placeholders and only BIGINT/TEXT
//! columns, so both backends run the same statements. Write transactions go
//! through [`Db::begin_write`]: `BEGIN IMMEDIATE` on SQLite (one writer at a
//! time), a plain read-committed transaction on PostgreSQL where conditional
//! `UPDATE ... WHERE` statements make claims atomic.

pub mod rows;

use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Executor, Row};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database: {0}")]
    Sqlx(#[from] sqlx::Error),
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("unsupported database URL (want sqlite:// or postgres://): {0}")]
    Url(String),
    #[error("corrupt row in {table}: {message}")]
    Corrupt {
        table: &'static str,
        message: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// The pool and which backend it talks to.
#[derive(Clone, Debug)]
pub struct Db {
    pub pool: AnyPool,
    pub backend: Backend,
}

pub type Tx = sqlx::Transaction<'static, sqlx::Any>;

// The migrations, embedded at build time (a new file needs this crate rebuilt).
static SQLITE: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

impl Db {
    /// Connects and applies pending migrations.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self, DbError> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Backend::Postgres
        } else {
            return Err(DbError::Url(redact(url)));
        };
        let mut opts = AnyPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(30));
        if backend == Backend::Sqlite {
            opts = opts.after_connect(|conn, _| {
                Box::pin(async move {
                    conn.execute(
                        "PRAGMA busy_timeout = 10000; PRAGMA foreign_keys = ON; \
                         PRAGMA synchronous = NORMAL; PRAGMA cache_size = -32768; \
                         PRAGMA mmap_size = 268435456; PRAGMA temp_store = MEMORY;",
                    )
                    .await?;
                    Ok(())
                })
            });
        }
        let pool = opts.connect(url).await?;
        if backend == Backend::Sqlite {
            // Persistent in the file: readers never wait for the writer.
            pool.execute("PRAGMA journal_mode = WAL").await?;
        }
        match backend {
            Backend::Sqlite => SQLITE.run(&pool).await?,
            Backend::Postgres => POSTGRES.run(&pool).await?,
        }
        Ok(Self { pool, backend })
    }

    /// A write transaction (see the module doc).
    pub async fn begin_write(&self) -> Result<Tx, DbError> {
        Ok(match self.backend {
            Backend::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await?,
            Backend::Postgres => self.pool.begin().await?,
        })
    }
}

/// A URL without its password, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// Current time, Unix milliseconds.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

pub fn to_time(ms: i64) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

/// Reads a column, mapping sqlx errors.
pub fn col<'r, T>(row: &'r AnyRow, name: &str) -> Result<T, DbError>
where
    T: sqlx::Decode<'r, sqlx::Any> + sqlx::Type<sqlx::Any>,
{
    Ok(row.try_get(name)?)
}

/// Reads a text column and parses it (ids, states).
pub fn parsed<T: std::str::FromStr>(
    row: &AnyRow,
    name: &str,
    table: &'static str,
) -> Result<T, DbError>
where
    T::Err: std::fmt::Display,
{
    let s: String = row.try_get(name)?;
    s.parse().map_err(|e: T::Err| DbError::Corrupt {
        table,
        message: format!("{name}: {e}"),
    })
}

/// Reads a nullable text column and parses it.
pub fn parsed_opt<T: std::str::FromStr>(
    row: &AnyRow,
    name: &str,
    table: &'static str,
) -> Result<Option<T>, DbError>
where
    T::Err: std::fmt::Display,
{
    let s: Option<String> = row.try_get(name)?;
    s.map(|s| {
        s.parse().map_err(|e: T::Err| DbError::Corrupt {
            table,
            message: format!("{name}: {e}"),
        })
    })
    .transpose()
}

/// Whether an error is a unique-constraint violation.
pub fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.is_unique_violation())
}

/// A transaction the database aborted to resolve a conflict with another
/// one (PostgreSQL deadlock 40P01 or serialization failure 40001; SQLite
/// busy): running it again is safe and usually succeeds.
pub fn is_retryable(e: &DbError) -> bool {
    match e {
        DbError::Sqlx(sqlx::Error::Database(d)) => matches!(
            d.code().as_deref(),
            Some("40P01" | "40001" | "5" | "6" | "517")
        ),
        _ => false,
    }
}

/// Attempts a retryable write transaction gets.
pub const WRITE_ATTEMPTS: u32 = 5;

#[cfg(test)]
mod tests {
    #[test]
    fn redacts_passwords() {
        assert_eq!(
            super::redact("postgres://u:secret@h:5/db"),
            "postgres://u:***@h:5/db"
        );
        assert_eq!(super::redact("sqlite:///x.db"), "sqlite:///x.db");
    }
}
