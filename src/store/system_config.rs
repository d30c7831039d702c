//! `system_config`: read at start-up, then kept current by LISTEN/NOTIFY (the table's
//! trigger notifies `milvus_sidecar_config`), with a periodic reload as a safety net.

use std::future::poll_fn;
use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::{AsyncMessage, NoTls};

use crate::settings::Settings;

const CHANNEL: &str = "milvus_sidecar_config";
const REFRESH: Duration = Duration::from_secs(30);

/// Reads every row into `settings`.
pub async fn load(client: &tokio_postgres::Client, settings: &Settings) -> Result<(), tokio_postgres::Error> {
    for row in client.query("SELECT config_key, config_value FROM system_config", &[]).await? {
        if let Err(problem) = settings.apply(row.get(0), row.get(1)) {
            tracing::warn!("{problem}");
        }
    }
    Ok(())
}

/// Keeps `settings` in step with the table until the process ends; reconnects as needed.
pub fn watch(config: tokio_postgres::Config, settings: Arc<Settings>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            if let Err(e) = listen(&config, &settings).await {
                tracing::warn!(error = %e, "lost the system_config watch; reconnecting in 1 s");
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    })
}

async fn listen(config: &tokio_postgres::Config, settings: &Settings) -> Result<(), tokio_postgres::Error> {
    let (client, mut connection) = config.connect(NoTls).await?;
    let (notify_tx, mut notified) = tokio::sync::mpsc::unbounded_channel();
    // The connection must be polled for notifications to arrive.
    let pump = tokio::spawn(async move {
        loop {
            match poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(_))) => {
                    let _ = notify_tx.send(());
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e),
                None => return Ok(()),
            }
        }
    });
    client.batch_execute(&format!("LISTEN {CHANNEL}")).await?;
    load(&client, settings).await?;
    let result = loop {
        tokio::select! {
            got = notified.recv() => if got.is_none() { break Ok(()) },
            _ = tokio::time::sleep(REFRESH) => {}
        }
        if let Err(e) = load(&client, settings).await {
            break Err(e);
        }
    };
    pump.abort();
    result
}
