//! A TCP relay that a test can cut and restore, to take a server "away" from the sidecar
//! without stopping the server other tests share.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Bytes that, sent by a client, stall its connection there (see [`Relay::stall_at`]), and
/// whether the client has closed a connection stalled so since.
#[derive(Default)]
struct TrapState {
    armed: Option<&'static [u8]>,
    closed: bool,
}
type Trap = Arc<Mutex<TrapState>>;

pub struct Relay {
    pub addr: SocketAddr,
    up: Arc<AtomicBool>,
    cut: watch::Sender<u64>,
    /// Counts stalls: connections stop carrying bytes but stay open, as across a network
    /// that went away without a reset.
    stall: watch::Sender<u64>,
    stalled: Arc<AtomicBool>,
    trap: Trap,
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
        let trap = Trap::default();
        let traps = trap.clone();
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
                let traps = traps.clone();
                tokio::spawn(async move {
                    if !silent {
                        let Ok(mut server) = TcpStream::connect(&target).await else { return };
                        tokio::select! {
                            _ = carry(&mut client, &mut server, &traps) => return,
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
        Relay { addr, up, cut, stall, stalled, trap, task }
    }

    /// The first connection whose client sends `bytes` from now on stalls right there (they
    /// are not passed on): it stays open and carries nothing, until [`Relay::cut`] or
    /// [`Relay::restore`]. The others carry on. For a server that goes silent mid-exchange.
    pub fn stall_at(&self, bytes: &'static [u8]) {
        *self.trap.lock().unwrap() = TrapState { armed: Some(bytes), closed: false };
    }

    /// Whether the client closed the connection [`Relay::stall_at`] stalled, within `within`.
    pub async fn wait_for_stalled_close(&self, within: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + within;
        while !self.trap.lock().unwrap().closed && std::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        self.trap.lock().unwrap().closed
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

/// Carries bytes both ways until either side closes. Should the client send the trap's
/// bytes, the connection stalls there: they are not passed on, and what the client sends
/// from then on is read and dropped until it closes the connection, which the trap records.
async fn carry(client: &mut TcpStream, server: &mut TcpStream, trap: &Trap) {
    let (mut client_in, mut client_out) = client.split();
    let (mut server_in, mut server_out) = server.split();
    let up = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match client_in.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let sprung = {
                let mut state = trap.lock().unwrap();
                let hit = state.armed.is_some_and(|bytes| buf[..n].windows(bytes.len()).any(|w| w == bytes));
                if hit {
                    state.armed = None;
                }
                hit
            };
            if sprung {
                while matches!(client_in.read(&mut buf).await, Ok(n) if n > 0) {}
                trap.lock().unwrap().closed = true;
                return;
            }
            if server_out.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    let down = async {
        let _ = tokio::io::copy(&mut server_in, &mut client_out).await;
    };
    tokio::select! {
        _ = up => {}
        _ = down => {}
    }
}
