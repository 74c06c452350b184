//! The running call's cancel check, seen inside one op. A call sets it for its duration on its own thread
//! ([`scope`]); the long loops of the own CPU kernels poll it ([`check`]) between chunks of work on that thread —
//! rayon workers never need it — and stop with `Cancelled`, so a cancel does not wait for the end of a whole block
//! (a 16384-position attention or a full-resolution convolution can take seconds on a CPU).

use std::cell::Cell;

use rayon::prelude::*;

use crate::error::{Error, Result};

type CheckPtr = *const (dyn Fn() -> bool + 'static);

thread_local! {
    /// The check of the call running on this thread; None outside a call. Valid while the [`scope`] that set it runs.
    static CHECK: Cell<Option<CheckPtr>> = const { Cell::new(None) };
}

/// Run `f` with `cancelled` as this thread's cancel check; the previous check comes back afterwards, also on a panic.
pub fn scope<R>(cancelled: &dyn Fn() -> bool, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<CheckPtr>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let prev = self.0;
            let _ = CHECK.try_with(|c| c.set(prev));
        }
    }
    let ptr: *const (dyn Fn() -> bool + '_) = cancelled;
    // SAFETY: only the lifetime is widened. The pointer is reachable only through CHECK on this thread, and
    // `Restore` takes it out again before `cancelled` can go (when this frame ends, by return or unwind).
    let ptr: CheckPtr = unsafe { std::mem::transmute(ptr) };
    let _restore = Restore(CHECK.with(|c| c.replace(Some(ptr))));
    f()
}

/// `Err(Cancelled)` when the call running on this thread has been cancelled; Ok outside a call (and on threads that
/// run no call, such as rayon's workers).
pub fn check() -> Result<()> {
    let check = CHECK.try_with(|c| c.get()).ok().flatten();
    // SAFETY: a pointer in CHECK is live while its `scope` runs on this thread (see there).
    if check.is_some_and(|c| unsafe { (*c)() }) {
        Err(Error::Cancelled)
    } else {
        Ok(())
    }
}

/// `f(state, i)` for every `i` in `0..n` on the rayon pool, `chunk` items at first and more while chunks are quick
/// (`init` makes a worker's state, as `for_each_init`), polling [`check`] on the calling thread before each chunk.
/// Items never depend on the chunking, so results are the same as one parallel loop's.
pub(crate) fn par_for_each_checked<T>(
    n: usize,
    chunk: usize,
    init: impl Fn() -> T + Sync + Send,
    f: impl Fn(&mut T, usize) + Sync + Send,
) -> Result<()> {
    let mut chunk = chunk.max(1);
    let mut start = 0;
    while start < n {
        check()?;
        let end = (start + chunk).min(n);
        let began = std::time::Instant::now();
        (start..end).into_par_iter().for_each_init(&init, |s, i| f(s, i));
        // Short items (cross-attention rows over 77 keys) would pay a fork-join barrier every few items: grow the
        // chunk while one takes less than CHUNK_TIME, so polls stay about that far apart and no closer.
        if began.elapsed() < CHUNK_TIME {
            chunk = chunk.saturating_mul(2);
        }
        start = end;
    }
    Ok(())
}

/// How long a chunk of [`par_for_each_checked`] may take before it stops growing: the cancel latency inside an op
/// is about twice this.
const CHUNK_TIME: std::time::Duration = std::time::Duration::from_millis(10);

/// Items per chunk for [`par_for_each_checked`] with `threads` workers: a few per worker, so the pool stays busy
/// between polls while a poll comes every few items' time.
pub(crate) fn chunk_for(threads: usize) -> usize {
    4 * threads.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    #[test]
    fn a_scope_sets_the_check_for_its_thread_only_and_restores_it() {
        assert!(check().is_ok());
        let flag = AtomicBool::new(false);
        scope(&|| flag.load(Ordering::SeqCst), || {
            assert!(check().is_ok());
            flag.store(true, Ordering::SeqCst);
            assert!(matches!(check(), Err(Error::Cancelled)));
            // Other threads (rayon's workers among them) run no call.
            std::thread::scope(|s| s.spawn(|| assert!(check().is_ok())).join().unwrap());
            // A nested scope replaces it and gives it back.
            scope(&|| false, || assert!(check().is_ok()));
            assert!(check().is_err());
        });
        assert!(check().is_ok());
        let r = std::panic::catch_unwind(|| scope(&|| true, || panic!("inside")));
        assert!(r.is_err());
        assert!(check().is_ok(), "a panic restores the previous check");
    }

    #[test]
    fn a_checked_loop_stops_between_chunks_and_covers_every_item_otherwise() {
        let seen = AtomicUsize::new(0);
        par_for_each_checked(1000, 16, || (), |_, _| {
            seen.fetch_add(1, Ordering::SeqCst);
        })
        .unwrap();
        assert_eq!(seen.load(Ordering::SeqCst), 1000);
        let seen = AtomicUsize::new(0);
        let r = scope(&|| seen.load(Ordering::SeqCst) >= 40, || {
            par_for_each_checked(1000, 16, || (), |_, _| {
                seen.fetch_add(1, Ordering::SeqCst);
            })
        });
        assert!(matches!(r, Err(Error::Cancelled)));
        assert_eq!(seen.load(Ordering::SeqCst), 48, "stopped at the first poll after the cancel");
    }

    /// The own CPU kernels poll inside one call: attention and both convolution paths stop after a few polls when
    /// the check says so, and give their exact result when it never does.
    #[test]
    fn attention_and_convolutions_poll_the_call_inside_one_op() {
        use candle_core::{Device, Tensor};
        let t = |shape: &[usize], seed: f32| {
            let n: usize = shape.iter().product();
            let v: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.37 + seed).sin()).collect();
            Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
        };
        let (q, k, v) = (t(&[1, 2048, 64], 0.0), t(&[1, 2048, 64], 1.0), t(&[1, 2048, 64], 2.0));
        let x = t(&[1, 16, 256, 256], 3.0);
        let (w3, w1) = (t(&[16, 16, 3, 3], 4.0), t(&[16, 16, 1, 1], 5.0));
        type Op<'a> = Box<dyn Fn() -> Result<Tensor> + 'a>;
        let ops: Vec<(&str, Op)> = vec![
            ("attention", Box::new(|| crate::ops::attention(&q, &k, &v, 8, 0.125, false))),
            // 3×3 stride 1 takes the Winograd path, stride 2 and 1×1 the im2col one.
            ("conv3x3", Box::new(|| crate::ops::conv2d(&x, &w3, None, 1, 1))),
            ("conv3x3 stride 2", Box::new(|| crate::ops::conv2d(&x, &w3, None, 2, 1))),
            ("conv1x1", Box::new(|| crate::ops::conv2d(&x, &w1, None, 1, 0))),
        ];
        for (name, op) in &ops {
            let exact = op().unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let polls = AtomicUsize::new(0);
            let r = scope(&|| polls.fetch_add(1, Ordering::SeqCst) >= 1, || op());
            assert!(matches!(r, Err(Error::Cancelled)), "{name}: not cancelled");
            assert_eq!(polls.load(Ordering::SeqCst), 2, "{name}: stopped at the second poll");
            let quiet = scope(&|| false, || op()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(quiet, exact, "{name}: polling changed the result");
        }
    }
}
