//! Busy polling (`--busy-poll`): before the call thread goes to sleep in `epoll_wait`, it
//! first polls the runtime's epoll instance for a while, without sleeping.
//!
//! At concurrency 1 a call wakes the sidecar's thread twice (the request, then Milvus's
//! reply); each wake-up is a trip through the scheduler, the waker's side and the switch
//! back, after which the call runs on cold caches. On the bench's VMs that was a quarter of
//! forwarding's CPU at c=1 and most of the latency it added (README, Performance). A thread
//! still running when the event arrives skips all of it.
//! The price is CPU: the thread spins through every gap between events shorter than the
//! window. It therefore spins only while few calls are in flight (under load the thread
//! rarely waits anyway, and on a machine whose cores the sidecar shares with its client or
//! Milvus, spinning there would take CPU from what it waits for), and only where the
//! recent waits were short enough for a spin to catch (see `BusyPoll::expected`).
//!
//! tokio keeps its epoll instance to itself, so it is found as the one, among the process's
//! eventpoll descriptors, that watches a socket just registered with the runtime
//! (`/proc/self/fdinfo`). `poll(2)` on an epoll descriptor says whether events are ready
//! without taking them, so tokio still gets them all.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use prometheus::IntGauge;

/// Spinning stops once more calls than this are in flight.
pub const MAX_CALLS_IN_FLIGHT: i64 = 2;

/// The longest window `--busy-poll` takes: beyond it a quiet sidecar would spin for long
/// stretches for nothing.
pub const MAX_WINDOW: Duration = Duration::from_millis(1);

/// tokio's epoll instance is open twice (it keeps a duplicate); more than this many found
/// would mean the search matched something else.
const POLLED_MAX: usize = 4;

/// No park is being timed.
const UNTIMED: usize = usize::MAX;

/// The spinning done before each park of a runtime's thread.
pub struct BusyPoll {
    window: Duration,
    /// The runtime's epoll instances (tokio keeps a duplicate of its own).
    epoll: OnceLock<Box<[RawFd]>>,
    /// Calls in progress; spinning waits for it to be known.
    calls: OnceLock<IntGauge>,
    /// Per number of calls in flight (0 to [`MAX_CALLS_IN_FLIGHT`]): the recent waits with
    /// that many, a moving average in nanoseconds; a spin is tried while it is within the
    /// window. A thread waits for different things with a different number in flight (at
    /// c=1: the next request with none, Milvus's reply with one), and they can be far apart:
    /// a reply from a Milvus that searches for milliseconds is not worth a spin, the
    /// client's next request may be.
    expected: [AtomicU64; MAX_CALLS_IN_FLIGHT as usize + 1],
    /// The park being timed (to learn whether its wait was short): its number of calls in
    /// flight, or [`UNTIMED`], and when it began, in nanoseconds since `epoch`.
    timing: AtomicUsize,
    parked_at: AtomicU64,
    epoch: Instant,
    /// Off for good once polling the descriptors failed.
    broken: AtomicBool,
}

impl BusyPoll {
    pub fn new(window: Duration) -> Arc<BusyPoll> {
        Arc::new(BusyPoll::unbounded(window.min(MAX_WINDOW)))
    }

    fn unbounded(window: Duration) -> BusyPoll {
        BusyPoll {
            window,
            epoll: OnceLock::new(),
            calls: OnceLock::new(),
            expected: std::array::from_fn(|_| AtomicU64::new(0)),
            timing: AtomicUsize::new(UNTIMED),
            parked_at: AtomicU64::new(0),
            epoch: Instant::now(),
            broken: AtomicBool::new(false),
        }
    }

    /// Builds `builder`'s runtime with the spin before each park.
    pub fn build(self: &Arc<Self>, builder: &mut tokio::runtime::Builder) -> std::io::Result<tokio::runtime::Runtime> {
        let (parking, unparked) = (self.clone(), self.clone());
        builder.on_thread_park(move || parking.before_park());
        builder.on_thread_unpark(move || unparked.after_unpark());
        let runtime = builder.build()?;
        let found = epoll_of(&runtime);
        if found.is_empty() || found.len() > POLLED_MAX {
            tracing::warn!(
                found = found.len(),
                "busy polling is off: the runtime's epoll instance was not found in /proc/self/fdinfo"
            );
        } else {
            let _ = self.epoll.set(found.into_boxed_slice());
        }
        Ok(runtime)
    }

    /// Where the number of calls in progress is read from.
    pub fn watch_calls(&self, calls: IntGauge) {
        let _ = self.calls.set(calls);
    }

    /// Whether the runtime's epoll instance was found.
    pub fn active(&self) -> bool {
        self.epoll.get().is_some() && !self.broken.load(Ordering::Relaxed)
    }

    /// Spins while the recent waits with as many calls in flight were short, and times the
    /// wait either way.
    fn before_park(&self) {
        let (Some(fds), Some(calls)) = (self.epoll.get(), self.calls.get()) else { return };
        let Some(state) = usize::try_from(calls.get()).ok().filter(|&n| n < self.expected.len()) else { return };
        if self.broken.load(Ordering::Relaxed) {
            return;
        }
        let began = self.now();
        if self.worth_a_spin(state) && self.spin(fds) {
            self.learn(state, self.now() - began);
            return;
        }
        self.parked_at.store(began, Ordering::Relaxed);
        self.timing.store(state, Ordering::Relaxed);
    }

    fn after_unpark(&self) {
        let state = self.timing.swap(UNTIMED, Ordering::Relaxed);
        if state != UNTIMED {
            self.learn(state, self.now() - self.parked_at.load(Ordering::Relaxed));
        }
    }

    fn worth_a_spin(&self, state: usize) -> bool {
        self.expected[state].load(Ordering::Relaxed) <= self.window.as_nanos() as u64
    }

    /// Folds one wait into the average, an eighth at a time. A long wait counts as four
    /// windows at most, so that a pause in the calls is forgotten after a dozen short waits.
    fn learn(&self, state: usize, waited: u64) {
        let waited = waited.min(4 * self.window.as_nanos() as u64);
        let expected = &self.expected[state];
        let before = expected.load(Ordering::Relaxed);
        expected.store(before - before / 8 + waited / 8, Ordering::Relaxed);
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// Polls `fds` until one has events ready (true) or the window is over (false).
    fn spin(&self, fds: &[RawFd]) -> bool {
        let mut polled = [libc::pollfd { fd: -1, events: libc::POLLIN, revents: 0 }; POLLED_MAX];
        for (slot, &fd) in polled.iter_mut().zip(fds) {
            slot.fd = fd;
        }
        let until = Instant::now() + self.window;
        loop {
            // SAFETY: `polled` is a live array of pollfd; a negative fd is skipped by poll(2).
            let ready = unsafe { libc::poll(polled.as_mut_ptr(), polled.len() as libc::nfds_t, 0) };
            if ready > 0 {
                return true;
            }
            if ready < 0 {
                let error = std::io::Error::last_os_error();
                if error.kind() != std::io::ErrorKind::Interrupted {
                    tracing::warn!(%error, "busy polling stops: cannot poll the runtime's epoll instance");
                    self.broken.store(true, Ordering::Relaxed);
                    return false;
                }
            }
            if Instant::now() >= until {
                return false;
            }
            std::hint::spin_loop();
        }
    }
}

/// The descriptors of `runtime`'s epoll instance: those of the process's epoll instances
/// that hold a socket just registered with the runtime.
fn epoll_of(runtime: &tokio::runtime::Runtime) -> Vec<RawFd> {
    let _inside = runtime.enter();
    // Registered with the runtime's epoll instance as it is made; open until the search ends.
    let Ok(socket) = tokio::net::UnixDatagram::unbound() else { return Vec::new() };
    let probe = socket.as_raw_fd();
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else { return Vec::new() };
    let mut found: Vec<RawFd> = dir
        .flatten()
        .filter(|entry| {
            std::fs::read_link(entry.path()).is_ok_and(|target| target.as_os_str() == "anon_inode:[eventpoll]")
        })
        .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
        .filter(|&epoll| watches(epoll, probe))
        .collect();
    drop(socket);
    found.sort_unstable();
    found
}

/// Whether the epoll instance `epoll` watches descriptor `fd` (its `tfd:` lines in fdinfo).
fn watches(epoll: RawFd, fd: RawFd) -> bool {
    let Ok(info) = std::fs::read_to_string(format!("/proc/self/fdinfo/{epoll}")) else { return false };
    info.lines()
        .filter_map(|line| line.strip_prefix("tfd:")?.split_whitespace().next()?.parse::<RawFd>().ok())
        .any(|watched| watched == fd)
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::mpsc;

    use tokio::io::AsyncReadExt;

    use super::*;

    fn runtime(busy: &Arc<BusyPoll>) -> tokio::runtime::Runtime {
        let mut builder = tokio::runtime::Builder::new_current_thread();
        builder.enable_all();
        busy.build(&mut builder).expect("runtime")
    }

    #[test]
    fn finds_each_runtime_its_own_epoll_instance() {
        let (first, second) = (BusyPoll::new(Duration::from_micros(50)), BusyPoll::new(Duration::from_micros(50)));
        let (_first_runtime, _second_runtime) = (runtime(&first), runtime(&second));
        assert!(first.active() && second.active(), "no epoll instance found for a runtime");
        let (first, second) = (first.epoll.get().unwrap(), second.epoll.get().unwrap());
        assert!(first.iter().all(|fd| !second.contains(fd)), "both runtimes matched {first:?} / {second:?}");
        for &fd in first.iter().chain(second.iter()) {
            let target = std::fs::read_link(format!("/proc/self/fd/{fd}")).unwrap();
            assert_eq!(target.as_os_str(), "anon_inode:[eventpoll]");
        }
    }

    /// A spin that missed the event would hold the thread for its whole window (capped at
    /// 1 ms by `new`, stretched here): the reads must complete long before, through tokio,
    /// with the bytes intact, every wait caught by a spin.
    #[test]
    fn a_spinning_thread_hands_every_event_to_tokio() {
        let busy = Arc::new(BusyPoll::unbounded(Duration::from_secs(30)));
        let runtime = runtime(&busy);
        busy.watch_calls(IntGauge::new("calls", "calls").unwrap());
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (done, finished) = mpsc::channel();
        let writer = std::thread::spawn(move || {
            let (mut peer, _) = listener.accept().unwrap();
            for byte in 1..=20u8 {
                std::thread::sleep(Duration::from_millis(5));
                peer.write_all(&[byte]).unwrap();
            }
        });
        std::thread::spawn(move || {
            let got = runtime.block_on(async move {
                let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
                let mut got = Vec::new();
                for _ in 0..20 {
                    got.push(stream.read_u8().await.unwrap());
                }
                got
            });
            let _ = done.send(got);
        });
        let got = finished.recv_timeout(Duration::from_secs(10)).expect("reads stalled in the spin");
        assert_eq!(got, (1..=20).collect::<Vec<u8>>());
        writer.join().unwrap();
        assert!(busy.worth_a_spin(0), "the 5 ms waits, each caught by a spin, count as long");
    }

    #[test]
    fn spins_only_at_low_concurrency() {
        let busy = Arc::new(BusyPoll::unbounded(Duration::from_secs(30)));
        let _runtime = runtime(&busy);
        let calls = IntGauge::new("calls", "calls").unwrap();
        busy.watch_calls(calls.clone());
        calls.set(MAX_CALLS_IN_FLIGHT + 1);
        // Nothing is ready on the idle runtime: a spin would last the whole 30 s window.
        let (done, finished) = mpsc::channel();
        let spinner = busy.clone();
        std::thread::spawn(move || {
            spinner.before_park();
            let _ = done.send(());
        });
        finished.recv_timeout(Duration::from_secs(10)).expect("spun with many calls in flight");
        assert_eq!(busy.timing.load(Ordering::Relaxed), UNTIMED, "a park beyond the spinning states was timed");
    }

    /// Nothing ever becomes ready on an idle runtime, so every spin runs out its window.
    #[test]
    fn long_waits_stop_the_spin_and_short_ones_bring_it_back() {
        let window = Duration::from_millis(2);
        let busy = Arc::new(BusyPoll::unbounded(window));
        let _runtime = runtime(&busy);
        let calls = IntGauge::new("calls", "calls").unwrap();
        busy.watch_calls(calls.clone());
        calls.set(1);

        // Each park spins out its window, and its wait is timed: the waits with one call in
        // flight soon count as longer than the window, the other states are untouched.
        let mut parks = 0;
        while busy.worth_a_spin(1) {
            busy.before_park();
            assert_eq!(busy.timing.load(Ordering::Relaxed), 1, "a spin that caught nothing left its wait untimed");
            std::thread::sleep(window);
            busy.after_unpark();
            parks += 1;
            assert!(parks < 50, "50 waits of twice the window still count as short");
        }
        assert!(parks > 1, "one long wait was enough to stop spinning");
        assert!(busy.worth_a_spin(0) && busy.worth_a_spin(2), "another state changed");

        // Instant wake-ups bring the spin back within a dozen or so.
        let mut parks = 0;
        while !busy.worth_a_spin(1) {
            busy.before_park();
            busy.after_unpark();
            parks += 1;
            assert!(parks < 50, "50 instant wake-ups did not bring the spin back");
        }
        assert_eq!(busy.timing.load(Ordering::Relaxed), UNTIMED);
    }
}
