//! A waker of its own for a future the driver polls beside its work.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Wake, Waker};

/// A waker of its own for a future polled beside the driver's work (the
/// shutdown future): the driver is woken by every frame and every socket,
/// and polling that future each time (a task's join handle, say) costs more
/// than the check whether it asked to be polled.
pub(super) struct OwnWake {
    shared: Arc<OwnWakeShared>,
    waker: Waker,
    /// The task waker last handed to `shared`.
    registered: Option<Waker>,
}

struct OwnWakeShared {
    woken: AtomicBool,
    outer: Mutex<Option<Waker>>,
}

impl Wake for OwnWakeShared {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        let outer = self.outer.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(w) = outer.as_ref() {
            w.wake_by_ref();
        }
    }
}

impl OwnWake {
    pub(super) fn new() -> Self {
        let shared = Arc::new(OwnWakeShared {
            // Polled the first time.
            woken: AtomicBool::new(true),
            outer: Mutex::new(None),
        });
        Self {
            waker: Waker::from(shared.clone()),
            shared,
            registered: None,
        }
    }

    /// The context to poll the future with, when it was woken since it was
    /// last polled (or never polled); `None` when it need not be polled.
    /// Wakes of the future wake `cx`'s task.
    pub(super) fn due(&mut self, cx: &Context<'_>) -> Option<Context<'_>> {
        if !self
            .registered
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            let waker = cx.waker().clone();
            *self.shared.outer.lock().unwrap_or_else(|e| e.into_inner()) = Some(waker.clone());
            self.registered = Some(waker);
        }
        // Cleared before the poll: a wake during it is not lost.
        if self.shared.woken.swap(false, Ordering::AcqRel) {
            Some(Context::from_waker(&self.waker))
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::task::Poll;

    /// Counts its wakes.
    #[derive(Default)]
    struct Count(std::sync::atomic::AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// A future that stays pending, counts its polls and keeps the waker
    /// it was last polled with.
    #[derive(Default)]
    struct Pending {
        polls: usize,
        waker: Option<Waker>,
    }

    impl Future for Pending {
        type Output = ();
        fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            self.polls += 1;
            self.waker = Some(cx.waker().clone());
            Poll::Pending
        }
    }

    fn step(own: &mut OwnWake, cx: &Context<'_>, fut: &mut Pending) {
        if let Some(mut scx) = own.due(cx) {
            assert!(std::pin::Pin::new(fut).poll(&mut scx).is_pending());
        }
    }

    #[test]
    fn polls_only_after_a_wake_and_passes_the_wake_on() {
        let task = Arc::new(Count::default());
        let task_waker = Waker::from(task.clone());
        let cx = Context::from_waker(&task_waker);
        let mut own = OwnWake::new();
        let mut fut = Pending::default();
        for _ in 0..3 {
            step(&mut own, &cx, &mut fut);
        }
        assert_eq!(fut.polls, 1, "polled the first time only, until woken");
        assert_eq!(task.0.load(Ordering::SeqCst), 0);

        fut.waker.take().unwrap().wake();
        assert_eq!(task.0.load(Ordering::SeqCst), 1, "the task heard the wake");
        for _ in 0..3 {
            step(&mut own, &cx, &mut fut);
        }
        assert_eq!(fut.polls, 2, "polled once more after one wake");
    }

    #[test]
    fn a_new_task_waker_gets_the_wakes() {
        let first = Arc::new(Count::default());
        let second = Arc::new(Count::default());
        let (w1, w2) = (Waker::from(first.clone()), Waker::from(second.clone()));
        let mut own = OwnWake::new();
        let held = own
            .due(&Context::from_waker(&w1))
            .expect("due the first time")
            .waker()
            .clone();
        assert!(own.due(&Context::from_waker(&w2)).is_none());
        held.wake();
        assert_eq!(first.0.load(Ordering::SeqCst), 0);
        assert_eq!(second.0.load(Ordering::SeqCst), 1);
    }
}
