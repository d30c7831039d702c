//! The recorder thread's CPU priority. Nothing waits for the writer while it keeps up (calls
//! only queue their facts), so its thread gives way to the calls: Linux's `SCHED_IDLE`
//! while the queue stays short, normal priority again once records back up, so a busy
//! machine cannot starve it. A thread may always lower its priority but may raise it back
//! only with `CAP_SYS_NICE` or an `RLIMIT_NICE` of 20 or more; where the process may not,
//! the thread stays at normal priority throughout, as it would otherwise be stuck below it.

/// Whether the writer's thread runs at idle priority, and whether it may.
pub struct Priority {
    /// Lowering is allowed: the thread can be raised again.
    adaptive: bool,
    idle: bool,
}

impl Priority {
    /// Normal priority, never changed.
    pub fn fixed() -> Priority {
        Priority { adaptive: false, idle: false }
    }

    /// Normal priority for now, idle from the first [`Priority::keep_up`] that finds the
    /// writer keeping up, where a thread may be raised back (found out on a thread of its
    /// own, which is left at idle priority if it may not).
    pub fn adaptive() -> Priority {
        let reversible = std::thread::Builder::new()
            .name("recorder-probe".into())
            .spawn(|| set(Policy::Idle).is_ok() && set(Policy::Normal).is_ok())
            .ok()
            .and_then(|probe| probe.join().ok())
            .unwrap_or(false);
        if reversible {
            tracing::info!("the recorder yields the CPU to calls while it keeps up (SCHED_IDLE)");
        } else {
            tracing::info!(
                "the recorder runs at normal priority: this process may not raise a thread's priority back \
                 (CAP_SYS_NICE or RLIMIT_NICE >= 20 would let it yield the CPU to calls while it keeps up)"
            );
        }
        Priority { adaptive: reversible, idle: false }
    }

    /// Idle priority while `behind` is false, normal while it is true. Called from the
    /// writer's own thread.
    pub fn keep_up(&mut self, behind: bool) {
        let idle = !behind;
        if !self.adaptive || self.idle == idle {
            return;
        }
        match set(if idle { Policy::Idle } else { Policy::Normal }) {
            Ok(()) => self.idle = idle,
            Err(e) => {
                // Not expected after the probe; whatever the cause, stop trying.
                tracing::warn!(error = %e, "cannot change the recorder's CPU priority; it stays as it is");
                self.adaptive = false;
            }
        }
    }

    pub fn is_idle(&self) -> bool {
        self.idle
    }
}

#[derive(Clone, Copy)]
enum Policy {
    Idle,
    Normal,
}

/// Sets the calling thread's scheduling policy (a thread id of 0 is the caller).
#[cfg(target_os = "linux")]
fn set(policy: Policy) -> std::io::Result<()> {
    let policy = match policy {
        Policy::Idle => libc::SCHED_IDLE,
        Policy::Normal => libc::SCHED_OTHER,
    };
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid sched_param for the call's duration; pid 0 is this thread.
    if unsafe { libc::sched_setscheduler(0, policy, &param) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn set(_: Policy) -> std::io::Result<()> {
    Err(std::io::Error::from(std::io::ErrorKind::Unsupported))
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    fn policy_of_this_thread() -> i32 {
        // SAFETY: no arguments to get wrong; 0 is this thread.
        unsafe { libc::sched_getscheduler(0) }
    }

    #[test]
    fn the_thread_goes_idle_while_keeping_up_and_back_to_normal_when_behind() {
        std::thread::spawn(|| {
            let mut priority = Priority::adaptive();
            if !priority.adaptive {
                // Not allowed here (no CAP_SYS_NICE, low RLIMIT_NICE): the thread must
                // stay at normal priority whatever the writer reports.
                priority.keep_up(false);
                assert_eq!(policy_of_this_thread(), libc::SCHED_OTHER);
                assert!(!priority.is_idle());
                return;
            }
            assert_eq!(policy_of_this_thread(), libc::SCHED_OTHER, "normal until the writer reports");
            priority.keep_up(false);
            assert_eq!(policy_of_this_thread(), libc::SCHED_IDLE);
            assert!(priority.is_idle());
            priority.keep_up(true);
            assert_eq!(policy_of_this_thread(), libc::SCHED_OTHER);
            assert!(!priority.is_idle());
            priority.keep_up(false);
            assert_eq!(policy_of_this_thread(), libc::SCHED_IDLE);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn a_fixed_priority_never_changes() {
        std::thread::spawn(|| {
            let mut priority = Priority::fixed();
            priority.keep_up(false);
            assert_eq!(policy_of_this_thread(), libc::SCHED_OTHER);
            assert!(!priority.is_idle());
        })
        .join()
        .unwrap();
    }
}
