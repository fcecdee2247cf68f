//! The command-line tools built on the library: what a batch integrator or an
//! operator runs beside the worker, with the worker's own config.

pub mod batch;
pub mod dlq;
pub mod submit;
pub mod workers;

/// One connection to the config's database, with txq's tables made: a database
/// no worker has used yet answers "none" rather than an SQL error. The error is
/// the tool's message.
async fn connect_migrated(config: &crate::Config) -> Result<crate::Db, String> {
    let options = crate::db::PoolOptions {
        max_connections: 1,
        ..config.pool_options()
    };
    let db = crate::Db::connect(config.database_url.expose(), &options)
        .await
        .map_err(|e| format!("connecting to {}: {e}", config.database_url))?;
    crate::db::migrate(&db)
        .await
        .map_err(|e| format!("migrating: {e}"))?;
    Ok(db)
}
