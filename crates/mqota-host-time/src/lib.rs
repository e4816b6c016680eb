//! embassy-time's clock and timer queue on a host (Linux, macOS): what the
//! device runtime's `Timer`s and timeouts run on when the runtime is not on a
//! chip — the virtual devices of `mqota-virtual` and the runtime's own tests.
//!
//! embassy-time ships a `std` driver, but its timer queue holds at most 128
//! timers (`generic-queue-*`), one per waiting task; a full queue wakes the
//! timer it evicts at once. A process running thousands of virtual devices
//! has a timer per device (its MQTT keep-alive at least), so with the stock
//! driver the devices kept evicting and waking each other: a busy loop that
//! cost most of the simulator's CPU. This driver keeps one entry per task
//! (the earliest deadline it asked for, as the stock queue does) in ordered
//! maps without a limit: registering, replacing and expiring a timer cost
//! O(log n), and a task is woken only when its deadline has passed.
//!
//! A crate that uses it links it in with `use mqota_host_time as _;`; a
//! binary must not also enable embassy-time's `std` (or any other) driver.

#![deny(missing_docs)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Condvar, Mutex, OnceLock};
use std::task::Waker;
use std::time::{Duration, Instant};

use embassy_time_driver::Driver;

/// A task's identity: its waker's data and vtable pointers, which is what
/// [`Waker::will_wake`] compares.
type TaskKey = (usize, usize);

fn key(waker: &Waker) -> TaskKey {
    (waker.data() as usize, waker.vtable() as *const _ as usize)
}

/// The tasks waiting for a time, each once, at the earliest it asked for.
#[derive(Default)]
struct Queue {
    by_task: BTreeMap<TaskKey, (u64, Waker)>,
    by_time: BTreeSet<(u64, TaskKey)>,
}

impl Queue {
    /// Registers `waker` for `at`; true when `at` is now the earliest
    /// deadline of the queue (the alarm thread must wait less).
    fn schedule(&mut self, at: u64, waker: &Waker) -> bool {
        let k = key(waker);
        match self.by_task.get_mut(&k) {
            Some((old, _)) if *old <= at => return false,
            Some((old, w)) => {
                self.by_time.remove(&(*old, k));
                *old = at;
                w.clone_from(waker);
            }
            None => {
                self.by_task.insert(k, (at, waker.clone()));
            }
        }
        self.by_time.insert((at, k));
        self.by_time.first().is_some_and(|&(first, _)| first == at)
    }

    /// Takes the wakers whose time has come (`at <= now`) and returns the
    /// next deadline, if any.
    fn expire(&mut self, now: u64, due: &mut Vec<Waker>) -> Option<u64> {
        while let Some(&(at, k)) = self.by_time.first() {
            if at > now {
                return Some(at);
            }
            self.by_time.pop_first();
            if let Some((_, w)) = self.by_task.remove(&k) {
                due.push(w);
            }
        }
        None
    }
}

struct HostDriver {
    queue: Mutex<Queue>,
    /// Set when the earliest deadline moved up; the alarm thread waits on it.
    changed: Mutex<bool>,
    signal: Condvar,
}

embassy_time_driver::time_driver_impl!(static DRIVER: HostDriver = HostDriver {
    queue: Mutex::new(Queue { by_task: BTreeMap::new(), by_time: BTreeSet::new() }),
    changed: Mutex::new(false),
    signal: Condvar::new(),
});

/// The instant tick 0 stands for; the alarm thread starts with it.
fn zero() -> Instant {
    static ZERO: OnceLock<Instant> = OnceLock::new();
    *ZERO.get_or_init(|| {
        std::thread::Builder::new()
            .name("embassy-time-alarm".into())
            .spawn(alarm_thread)
            .expect("starting the embassy-time alarm thread");
        Instant::now()
    })
}

fn ticks_since(zero: Instant, t: Instant) -> u64 {
    let d = t.saturating_duration_since(zero);
    d.as_secs() * embassy_time_driver::TICK_HZ
        + u64::from(d.subsec_nanos()) * embassy_time_driver::TICK_HZ / 1_000_000_000
}

impl Driver for HostDriver {
    fn now(&self) -> u64 {
        ticks_since(zero(), Instant::now())
    }

    fn schedule_wake(&self, at: u64, waker: &Waker) {
        zero();
        let earliest = self.queue.lock().unwrap().schedule(at, waker);
        if earliest {
            *self.changed.lock().unwrap() = true;
            self.signal.notify_one();
        }
    }
}

/// Wakes the tasks whose time has come, then sleeps until the next deadline
/// or until an earlier one is registered.
fn alarm_thread() {
    let zero = zero();
    let mut due = Vec::new();
    loop {
        let now = DRIVER.now();
        let next = DRIVER.queue.lock().unwrap().expire(now, &mut due);
        // Wake outside the lock: a woken task may register again at once.
        due.drain(..).for_each(Waker::wake);
        let until = next.and_then(|t| {
            let secs = t / embassy_time_driver::TICK_HZ;
            let sub = t % embassy_time_driver::TICK_HZ;
            zero.checked_add(
                Duration::from_secs(secs)
                    + Duration::from_nanos(sub * 1_000_000_000 / embassy_time_driver::TICK_HZ),
            )
        });
        let mut changed = DRIVER.changed.lock().unwrap();
        while !*changed {
            match until {
                Some(until) => {
                    let now = Instant::now();
                    if now >= until {
                        break;
                    }
                    changed = DRIVER.signal.wait_timeout(changed, until - now).unwrap().0;
                }
                None => changed = DRIVER.signal.wait(changed).unwrap(),
            }
        }
        *changed = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::Wake;

    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn waker() -> (Arc<Count>, Waker) {
        let c = Arc::new(Count(AtomicUsize::new(0)));
        (c.clone(), Waker::from(c))
    }

    #[test]
    fn a_task_is_queued_once_at_its_earliest_deadline() {
        let mut q = Queue::default();
        let (_, a) = waker();
        assert!(q.schedule(50, &a));
        assert!(
            !q.schedule(70, &a),
            "a later deadline keeps the earlier one"
        );
        assert!(q.schedule(30, &a), "an earlier one replaces it");
        let mut due = Vec::new();
        assert_eq!(q.expire(29, &mut due), Some(30));
        assert!(due.is_empty());
        assert_eq!(q.expire(30, &mut due), None);
        assert_eq!(due.len(), 1);
        assert!(q.by_task.is_empty() && q.by_time.is_empty());
    }

    #[test]
    fn thousands_of_tasks_wait_without_waking_each_other() {
        // The stock queue holds 64 or 128: past that it woke tasks early.
        let mut q = Queue::default();
        let wakers: Vec<_> = (0..10_000).map(|_| waker()).collect();
        for (i, (_, w)) in wakers.iter().enumerate() {
            q.schedule(1_000 + i as u64, w);
        }
        let mut due = Vec::new();
        assert_eq!(q.expire(999, &mut due), Some(1_000));
        assert!(wakers.iter().all(|(c, _)| c.0.load(Ordering::SeqCst) == 0));
        assert_eq!(q.expire(1_000 + 4_999, &mut due), Some(6_000));
        assert_eq!(due.len(), 5_000);
        due.drain(..).for_each(Waker::wake);
        let woken = wakers
            .iter()
            .filter(|(c, _)| c.0.load(Ordering::SeqCst) == 1)
            .count();
        assert_eq!(woken, 5_000);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn embassy_timers_of_many_tasks_all_fire_and_none_before_its_time() {
        let start = embassy_time::Instant::now();
        let order = Arc::new(Mutex::new(Vec::new()));
        let local = tokio::task::LocalSet::new();
        for i in (0..500u64).rev() {
            let order = order.clone();
            local.spawn_local(async move {
                let at = start + embassy_time::Duration::from_millis(20 + (i % 50) * 4);
                embassy_time::Timer::at(at).await;
                assert!(embassy_time::Instant::now() >= at);
                order.lock().unwrap().push(at);
            });
        }
        local.await;
        let order = order.lock().unwrap();
        assert_eq!(order.len(), 500);
    }
}
