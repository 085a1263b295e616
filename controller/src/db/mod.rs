//! The database: one `sqlx::Any` pool over SQLite (default, a file in the
//! state dir) or PostgreSQL (by URL), migrated at start.
//!
//! All SQL is written once, with `$1` placeholders and only BIGINT/TEXT
//! columns, so both backends run the same statements. Write transactions go
//! through [`Db::begin_write`]: `BEGIN IMMEDIATE` on SQLite (one writer at a
//! time, each waiting for its turn in this process before it takes a
//! connection: [`tx`]), a plain read-committed transaction on PostgreSQL where conditional
//! `UPDATE ... WHERE` statements make claims atomic.
//!
//! SQLite runs in WAL mode with `synchronous = FULL`: a commit is
//! acknowledged only after the WAL is fsynced, so a power failure cannot
//! lose an acknowledged write (with `NORMAL` the last commits before the
//! loss could vanish). The database file and its `-wal`/`-shm` files are
//! private to the service user (0600, fixed at start); the state dir is
//! 0700 ([`private_dir`]).

pub mod group;
mod migrations;
pub mod rows;
mod tx;

use tx::Turns;
pub use tx::{interactive, Class, Tx, Writer};

use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Executor, Row};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database: {0}")]
    Sqlx(#[from] sqlx::Error),
    #[error("cannot make {path} private: {source}")]
    Mode {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("unsupported database URL (want sqlite:// or postgres://): {0}")]
    Url(String),
    #[error("no turn to write within {0:?}: the database is busy")]
    NoTurn(Duration),
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

/// The pool, which backend it talks to, and the writers' turns.
#[derive(Clone, Debug)]
pub struct Db {
    pub pool: AnyPool,
    pub backend: Backend,
    turns: Turns,
    /// Where write transactions run: on SQLite one connection of its own
    /// (see [`Db::begin_write`]), on PostgreSQL `pool`.
    writes: AnyPool,
}

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
        let file = sqlite_file(url);
        if let Some(f) = &file {
            private_file(f, true)?;
        }
        let opts = |max_connections| {
            let opts = AnyPoolOptions::new()
                .max_connections(max_connections)
                .acquire_timeout(Duration::from_secs(30));
            if backend != Backend::Sqlite {
                return opts;
            }
            opts.after_connect(|conn, _| {
                Box::pin(async move {
                    conn.execute(
                        "PRAGMA busy_timeout = 10000; PRAGMA foreign_keys = ON; \
                         PRAGMA synchronous = FULL; PRAGMA cache_size = -32768; \
                         PRAGMA mmap_size = 268435456; PRAGMA temp_store = MEMORY;",
                    )
                    .await?;
                    Ok(())
                })
            })
        };
        let pool = opts(max_connections).connect(url).await?;
        if backend == Backend::Sqlite {
            // Persistent in the file: readers never wait for the writer.
            pool.execute("PRAGMA journal_mode = WAL").await?;
        }
        if let Some(f) = &file {
            for ext in ["-wal", "-shm"] {
                let mut p = f.clone().into_os_string();
                p.push(ext);
                private_file(std::path::Path::new(&p), false)?;
            }
        }
        match backend {
            Backend::Sqlite => migrations::sqlite().await?.run(&pool).await?,
            Backend::Postgres => migrations::postgres().await?.run(&pool).await?,
        }
        let (turns, writes) = match backend {
            Backend::Sqlite if file.is_some() => {
                (Turns::one_at_a_time(), opts(1).connect(url).await?)
            }
            // A memory database is one per pool: write where it is read.
            Backend::Sqlite => (Turns::one_at_a_time(), pool.clone()),
            // Admission: at most half the pool writes at once, tenants'
            // writes first, so that neither a host flood's transactions
            // nor their CPU crowd out the readers and the tenants.
            Backend::Postgres => (
                Turns::writers_at_once((max_connections as usize / 2).max(1)),
                pool.clone(),
            ),
        };
        Ok(Self {
            pool,
            backend,
            turns,
            writes,
        })
    }

    /// A write transaction (see the module doc): on SQLite it waits for the
    /// writer's turn first ([`tx`]), then takes the writers' connection.
    /// SQLite empties a connection's page cache whenever another connection
    /// has written since its last transaction; the one writing connection
    /// keeps its cache (only it writes), and the pool's connections are left
    /// to readers.
    ///
    /// The `BEGIN` runs on a task of its own, which the caller's
    /// cancellation (a client that hung up) does not stop. Cancelled inside
    /// sqlx's `begin`, after the database had begun but before the
    /// `Transaction` existed, the connection went back to the pool still in
    /// its transaction: on SQLite holding the write lock for good, every
    /// later write failing with "database is locked" and every later
    /// `BEGIN` on it with "non-zero transaction depth". Run to the end, a
    /// begun transaction that nobody awaits is dropped, which rolls it
    /// back.
    pub async fn begin_write(&self) -> Result<Tx, DbError> {
        self.begin_write_asked_at(std::time::Instant::now()).await
    }

    /// As [`Db::begin_write`], for a writer acting for callers who asked at
    /// `asked` (see [`tx::Turns::take_asked_at`]).
    pub async fn begin_write_asked_at(&self, asked: std::time::Instant) -> Result<Tx, DbError> {
        let turn = self.turns.take_asked_at(asked).await?;
        let (pool, backend) = (self.writes.clone(), self.backend);
        let inner = tokio::spawn(async move {
            match backend {
                Backend::Sqlite => pool.begin_with("BEGIN IMMEDIATE").await,
                Backend::Postgres => pool.begin().await,
            }
        })
        .await
        .map_err(|e| match e.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            // Only when the runtime shuts down.
            Err(_) => DbError::NoTurn(Duration::ZERO),
        })??;
        Ok(Tx::new(inner, turn, backend))
    }

    /// The writer's turn and connection for a single-statement write on
    /// a busy path (audit rows, pruning): `execute(&mut *w)`.
    pub async fn writer(&self) -> Result<Writer, DbError> {
        let turn = self.turns.take().await?;
        let conn = self.writes.acquire().await?;
        Ok(Writer::new(conn, turn))
    }
}

/// The file of a `sqlite://PATH[?...]` URL (`None` for memory databases
/// and other backends).
fn sqlite_file(url: &str) -> Option<std::path::PathBuf> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let path = rest.split('?').next().unwrap_or_default();
    (!path.is_empty() && path != ":memory:").then(|| path.into())
}

/// Makes `path` mode 0600: created empty (an empty file is a valid SQLite
/// database) when `create` and missing, else fixed when it exists.
fn private_file(path: &std::path::Path, create: bool) -> Result<(), DbError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let err = |source| DbError::Mode {
        path: path.to_owned(),
        source,
    };
    match std::fs::metadata(path) {
        Ok(m) if m.permissions().mode() & 0o077 != 0 => {
            tracing::warn!(path = %path.display(), mode = format!("{:o}", m.permissions().mode() & 0o777), "database file was readable by others; now 0600");
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)
        }
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && create => std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map(drop)
            .or_else(|e| match e.kind() {
                std::io::ErrorKind::AlreadyExists => Ok(()),
                _ => Err(err(e)),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(err(e)),
    }
}

/// Creates `dir` (and its parents) with mode 0700, or makes an existing
/// one 0700 when others could read it.
pub fn private_dir(dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let mode = std::fs::metadata(dir)?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        tracing::warn!(path = %dir.display(), mode = format!("{mode:o}"), "state dir was open to others; now 0700");
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
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

/// Most ids one `IN (...)` list carries (well under the bound parameters
/// SQLite and PostgreSQL allow in one statement).
pub const IN_LIST_MAX: usize = 500;

/// `n` numbered placeholders from `$first` on, comma-separated (`$2, $3,
/// $4`), for an `IN (...)` list of at most [`IN_LIST_MAX`].
pub fn placeholders(first: usize, n: usize) -> String {
    (first..first + n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
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
        DbError::NoTurn(_) => true,
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
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &std::path::Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[tokio::test]
    async fn state_dir_and_database_files_are_private() {
        let top = tempfile::tempdir().unwrap();
        let dir = top.path().join("state");
        super::private_dir(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
        let f = dir.join("c.db");
        let url = format!("sqlite://{}?mode=rwc", f.display());
        let db = super::Db::connect(&url, 2).await.unwrap();
        sqlx::query("CREATE TABLE t (x INTEGER)")
            .execute(&db.pool)
            .await
            .unwrap();
        for ext in ["", "-wal", "-shm"] {
            let p = dir.join(format!("c.db{ext}"));
            assert_eq!(mode(&p), 0o600, "{}", p.display());
        }
        let sync: i64 = sqlx::query_scalar("PRAGMA synchronous")
            .fetch_one(&db.pool)
            .await
            .unwrap();
        assert_eq!(sync, 2, "synchronous = FULL");
        db.pool.close().await;
        // Existing files and dirs open to others are fixed at the next start.
        for p in [dir.clone(), f.clone()] {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        super::private_dir(&dir).unwrap();
        let _db = super::Db::connect(&url, 2).await.unwrap();
        assert_eq!((mode(&dir), mode(&f)), (0o700, 0o600));
    }

    /// A SQLite database of two pooled connections with a table `t (x)`
    /// (and the directory that holds it).
    async fn table_t() -> (tempfile::TempDir, super::Db) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("c.db").display());
        let db = super::Db::connect(&url, 2).await.unwrap();
        sqlx::query("CREATE TABLE t (x BIGINT)")
            .execute(&db.pool)
            .await
            .unwrap();
        (dir, db)
    }

    /// Callers that give up at every point of `begin_write` (a client
    /// hanging up) leave no connection inside a transaction: afterwards
    /// every pooled connection still begins and commits a write. Without
    /// the `BEGIN` on a task of its own, a cancel after SQLite had begun
    /// but before sqlx made its `Transaction` kept the write lock for good.
    #[tokio::test]
    async fn a_cancelled_begin_leaves_no_connection_in_a_transaction() {
        let (_dir, db) = table_t().await;
        // Gives up after `us` microseconds, yielding meanwhile.
        let give_up = |us: u64| async move {
            let t = std::time::Instant::now();
            while t.elapsed() < std::time::Duration::from_micros(us) {
                tokio::task::yield_now().await;
            }
        };
        for n in 0..400 {
            tokio::select! {
                _ = db.begin_write() => {}
                () = give_up(n * 5 % 1000) => {}
            }
        }
        // Both connections, one after the other and then at once.
        for i in 0..4 {
            let write = async {
                let mut tx = db.begin_write().await?;
                sqlx::query("INSERT INTO t (x) VALUES ($1)")
                    .bind(i)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok::<_, super::DbError>(())
            };
            tokio::time::timeout(std::time::Duration::from_secs(15), write)
                .await
                .expect("a write got no connection")
                .unwrap_or_else(|e| panic!("write {i} failed: {e}"));
        }
        let mut a = db.pool.acquire().await.unwrap();
        let mut b = db.pool.acquire().await.unwrap();
        for c in [&mut a, &mut b] {
            sqlx::query("SELECT COUNT(*) FROM t")
                .fetch_one(&mut **c)
                .await
                .unwrap();
        }
        drop((a, b));
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM t")
            .fetch_one(&db.pool)
            .await
            .unwrap();
        assert_eq!(n, 4);
    }

    /// Writes run on their own connection: readers holding every pooled
    /// connection neither block a write nor miss it.
    #[tokio::test]
    async fn writes_do_not_wait_for_pooled_connections() {
        let (_dir, db) = table_t().await;
        let mut readers = vec![
            db.pool.acquire().await.unwrap(),
            db.pool.acquire().await.unwrap(),
        ];
        let write = async {
            let mut tx = db.begin_write().await?;
            sqlx::query("INSERT INTO t (x) VALUES (7)")
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            let mut w = db.writer().await?;
            sqlx::query("INSERT INTO t (x) VALUES (8)")
                .execute(&mut *w)
                .await?;
            Ok::<_, super::DbError>(())
        };
        tokio::time::timeout(std::time::Duration::from_secs(5), write)
            .await
            .expect("the write waited for a pooled connection")
            .unwrap();
        let sum: i64 = sqlx::query_scalar("SELECT SUM(x) FROM t")
            .fetch_one(&mut *readers[0])
            .await
            .unwrap();
        assert_eq!(sum, 15, "a reader sees both writes");
        readers.clear();
    }

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            super::redact("postgres://u:secret@h:5/db"),
            "postgres://u:***@h:5/db"
        );
        assert_eq!(super::redact("sqlite:///x.db"), "sqlite:///x.db");
    }
}
