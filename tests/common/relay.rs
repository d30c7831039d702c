//! A TCP relay that a test can cut and restore, to take a server "away" from the sidecar
//! without stopping the server other tests share.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct Relay {
    pub addr: SocketAddr,
    up: Arc<AtomicBool>,
    cut: watch::Sender<u64>,
    /// Counts stalls: connections stop carrying bytes but stay open, as across a network
    /// that went away without a reset.
    stall: watch::Sender<u64>,
    stalled: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    pub async fn start(target: String) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let up = Arc::new(AtomicBool::new(true));
        let (cut, cuts) = watch::channel(0u64);
        let (stall, stalls) = watch::channel(0u64);
        let stalled = Arc::new(AtomicBool::new(false));
        let (flag, silent) = (up.clone(), stalled.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else { continue };
                if !flag.load(Ordering::SeqCst) {
                    drop(client); // refused while down
                    continue;
                }
                let target = target.clone();
                let mut cuts = cuts.clone();
                cuts.borrow_and_update(); // only cuts from now on end this connection
                let mut stalls = stalls.clone();
                stalls.borrow_and_update();
                let silent = silent.load(Ordering::SeqCst);
                tokio::spawn(async move {
                    if !silent {
                        let Ok(mut server) = TcpStream::connect(&target).await else { return };
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut client, &mut server) => return,
                            _ = cuts.changed() => return, // every connection dies at a cut
                            _ = stalls.changed() => {}
                        }
                    }
                    // Stalled: the connection stays open and carries nothing until a cut.
                    let _ = cuts.changed().await;
                    drop(client);
                });
            }
        });
        Relay { addr, up, cut, stall, stalled, task }
    }

    /// Every relayed connection, and each one made from now on, stays open but carries
    /// nothing, until [`Relay::cut`] or [`Relay::restore`].
    pub fn stall(&self) {
        self.stalled.store(true, Ordering::SeqCst);
        self.stall.send_modify(|n| *n += 1);
    }

    /// Closes every relayed connection and refuses new ones.
    pub fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        self.cut.send_modify(|n| *n += 1);
    }

    /// Takes new connections again; connections stalled until now are closed, as TCP gives
    /// up on them in the end.
    pub fn restore(&self) {
        if self.stalled.swap(false, Ordering::SeqCst) {
            self.cut.send_modify(|n| *n += 1);
        }
        self.up.store(true, Ordering::SeqCst);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}
