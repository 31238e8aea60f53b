//! A PostgreSQL database of a bench's own, created empty on a server and
//! dropped afterwards.

use sqlx::Connection;

/// A database of its own on the PostgreSQL server.
pub struct PgDatabase {
    server: String,
    name: String,
    /// The URL of the new database.
    pub url: String,
}

impl PgDatabase {
    pub async fn create(server: &str) -> Result<PgDatabase, Box<dyn std::error::Error>> {
        let name = format!("tg_bench_{}", uuid::Uuid::new_v4().simple());
        let mut url = url::Url::parse(server)?;
        url.set_path(&format!("/{name}"));
        let mut admin = sqlx::PgConnection::connect(server).await?;
        sqlx::query(&format!("CREATE DATABASE \"{name}\""))
            .execute(&mut admin)
            .await?;
        admin.close().await?;
        Ok(PgDatabase {
            server: server.to_owned(),
            name,
            url: url.to_string(),
        })
    }

    /// Drops the database; best-effort, a failure is only reported.
    pub async fn drop_now(self) {
        let dropped = async {
            let mut admin = sqlx::PgConnection::connect(&self.server).await?;
            sqlx::query(&format!(
                "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
                self.name
            ))
            .execute(&mut admin)
            .await?;
            admin.close().await
        };
        if let Err(e) = dropped.await {
            eprintln!("could not drop bench database {}: {e}", self.name);
        }
    }
}
