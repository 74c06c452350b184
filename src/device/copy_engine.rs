//! The copy engine: one persistent thread per device that uploads blocks ahead of use, so the next streamed block
//! crosses while the current one computes (was: one OS thread spawned per prefetched block).
//!
//! A job runs on the engine's thread and its result comes back as a [`Handoff`]: the value plus the event that marks
//! the end of its copies. The consumer (a compute thread) waits for the event *on the compute stream*
//! ([`Handoff::wait`]) and only then uses the value ([`Handoff::take`]); no thread blocks on the device.
//! - **CUDA:** the thread owns its own stream, forked from the compute stream's context; jobs allocate and copy on
//!   it and the engine records a `CUevent` after each job; [`Handoff::wait`] is `cuStreamWaitEvent` on the compute
//!   stream. Every destination buffer is handed to the compute stream as its owner (see `cuda::storage_from_bytes`)
//!   so that it is freed in order with the kernels that read it.
//! - **Emulated device and CPU:** the same thread runs the same jobs (the copies are synchronous there); an event is
//!   a completion flag set when the job has finished, and [`Handoff::take`] checks that the consumer waited for it:
//!   a use without a wait is counted in [`crate::device::DeviceUsage::unwaited_copy_uses`] (on CUDA such a use
//!   would let kernels read bytes not yet copied), so CPU tests catch a missing wait.
//!
//! The engine is created by the first job ([`crate::device::DeviceAllocator::copy_engine`]) and stops with the
//! allocator: its queue closes and the thread is joined once the jobs queued before have run.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, Weak};
use std::thread::{JoinHandle, ThreadId};

use crate::device::DeviceAllocator;
use crate::error::{Error, Result};

/// Where a job's copies go: the engine's stream on CUDA, nothing elsewhere (copies are synchronous there).
#[derive(Clone)]
pub struct CopyLane {
    #[cfg(feature = "cuda")]
    pub(crate) stream: Option<Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>>,
}

impl CopyLane {
    /// The engine's stream as a raw handle (CUDA; checks and logs), None elsewhere.
    pub fn stream_handle(&self) -> Option<usize> {
        #[cfg(feature = "cuda")]
        if let Some(s) = &self.stream {
            return Some(s.cu_stream() as usize);
        }
        None
    }
}

/// A queued job; it counts itself as run (the second argument) before its result is handed over.
type Job = Box<dyn FnOnce(&CopyLane, &AtomicU64) + Send>;

/// One device's copy thread and its queue. Owned by the device allocator; see the module documentation.
pub struct CopyEngine {
    queue: Mutex<Option<mpsc::Sender<Job>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    thread_id: ThreadId,
    jobs: Arc<AtomicU64>,
    /// Held by the thread while it runs (tests see it end).
    alive: Weak<()>,
}

/// The end of a job's copies, as the consumer must wait for it.
enum Event {
    /// Emulated device and CPU: set when the job has finished.
    Flag(Arc<AtomicBool>),
    /// Recorded on the engine's stream after the job's copies.
    #[cfg(feature = "cuda")]
    Cuda(candle_core::cuda_backend::cudarc::driver::CudaEvent),
}

/// A job submitted to the engine; [`Pending::recv`] gives its [`Handoff`] once the job has run (on CUDA: once its
/// copies are queued on the engine's stream, not necessarily done).
pub struct Pending<T> {
    rx: mpsc::Receiver<(Result<T>, Event)>,
}

/// A job's result handed to the compute side. Use it only through [`wait`](Self::wait) then [`take`](Self::take).
/// Dropped unused (a prefetch that will not be used), it waits on the host for its copies first, so the
/// destination and source stay valid until the device is done with them.
pub struct Handoff<T> {
    value: Option<T>,
    event: Event,
    waited: bool,
    alloc: DeviceAllocator,
}

impl CopyEngine {
    /// Start the thread. On CUDA `lane` holds the engine's own stream.
    pub(crate) fn start(lane: CopyLane) -> Result<Self> {
        let (tx, rx) = mpsc::channel::<Job>();
        let jobs = Arc::new(AtomicU64::new(0));
        let alive = Arc::new(());
        let weak = Arc::downgrade(&alive);
        let counter = jobs.clone();
        let handle = std::thread::Builder::new()
            .name("lowvram-copy".into())
            .spawn(move || {
                let _alive = alive;
                // Ends when the allocator drops the sender (after the jobs queued before it).
                while let Ok(job) = rx.recv() {
                    job(&lane, &counter);
                }
            })
            .map_err(|e| Error::OutOfHostMemory(format!("cannot start the copy thread: {e}")))?;
        Ok(Self {
            queue: Mutex::new(Some(tx)),
            thread_id: handle.thread().id(),
            thread: Mutex::new(Some(handle)),
            jobs,
            alive: weak,
        })
    }

    /// Queue `job` on the engine's thread. It gets the lane to copy on; its result comes back with the event that
    /// follows its copies. A panicking job is reported as an error (the thread keeps serving).
    pub fn submit<T, F>(&self, job: F) -> Result<Pending<T>>
    where
        T: Send + 'static,
        F: FnOnce(&CopyLane) -> Result<T> + Send + 'static,
    {
        let (tx, rx) = mpsc::sync_channel(1);
        let run: Job = Box::new(move |lane: &CopyLane, ran: &AtomicU64| {
            // The closure (and what it captured) is consumed here, before the result is sent: nothing of the
            // caller's outlives the hand-off on this thread.
            let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(lane)))
                .unwrap_or_else(|_| {
                    Err(Error::Tensor(candle_core::Error::Msg(
                        "a copy job panicked".into(),
                    )))
                });
            ran.fetch_add(1, Ordering::Relaxed);
            let event = match record(lane) {
                Ok(ev) => ev,
                Err(e) => {
                    // No event: the copies cannot be handed over, so the result is not usable; it is dropped once
                    // the engine's stream has finished them.
                    #[cfg(feature = "cuda")]
                    if let Some(s) = &lane.stream {
                        let _ = s.synchronize();
                    }
                    drop(out);
                    let _ = tx.send((Err(e), Event::Flag(Arc::new(AtomicBool::new(true)))));
                    return;
                }
            };
            // The consumer is gone (its `Pending` dropped): the result is dropped here, after its copies, like an
            // unused hand-off.
            if let Err(mpsc::SendError((out, event))) = tx.send((out, event)) {
                #[cfg(feature = "cuda")]
                if let Event::Cuda(ev) = &event {
                    let _ = ev.synchronize();
                }
                drop((out, event));
            }
        });
        let queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        match queue.as_ref().map(|q| q.send(run)) {
            Some(Ok(())) => Ok(Pending { rx }),
            _ => Err(Error::Tensor(candle_core::Error::Msg(
                "the copy engine has stopped".into(),
            ))),
        }
    }

    /// The engine's thread.
    pub fn thread_id(&self) -> ThreadId {
        self.thread_id
    }

    /// Jobs run so far.
    pub fn jobs(&self) -> u64 {
        self.jobs.load(Ordering::Relaxed)
    }

    /// Whether the thread is still running (tests: it ends with the allocator).
    pub fn alive_token(&self) -> Weak<()> {
        self.alive.clone()
    }
}

impl Drop for CopyEngine {
    fn drop(&mut self) {
        drop(self.queue.lock().unwrap_or_else(|e| e.into_inner()).take());
        let handle = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(h) = handle {
            // The last owner may be a job on the engine's own thread: it cannot join itself (it ends on its own
            // once the queue, now closed, is empty).
            if std::thread::current().id() != self.thread_id {
                let _ = h.join();
            }
        }
    }
}

/// The event that follows the job just run on `lane`.
fn record(lane: &CopyLane) -> Result<Event> {
    #[cfg(feature = "cuda")]
    if let Some(s) = &lane.stream {
        return s
            .record_event(None)
            .map(Event::Cuda)
            .map_err(super::pinned::cuda_err);
    }
    let _ = lane;
    Ok(Event::Flag(Arc::new(AtomicBool::new(true))))
}

impl<T> Pending<T> {
    /// Block until the job has run and return its hand-off (the job's error if it failed). `alloc` is the device
    /// the value will be used on.
    pub fn recv(self, alloc: &DeviceAllocator) -> Result<Handoff<T>> {
        let (out, event) = self.rx.recv().map_err(|_| {
            Error::Tensor(candle_core::Error::Msg(
                "the copy engine dropped a job".into(),
            ))
        })?;
        let mut h = Handoff {
            value: None,
            event,
            waited: false,
            alloc: alloc.clone(),
        };
        match out {
            Ok(v) => {
                h.value = Some(v);
                Ok(h)
            }
            // `h` drops here with no value: it still waits for whatever the failed job had queued.
            Err(e) => Err(e),
        }
    }
}

impl<T> Handoff<T> {
    /// Make the compute side wait for the job's copies: on CUDA the compute stream waits for the event (the host
    /// does not); on the emulated device the event's flag is checked and the wait recorded.
    pub fn wait(&mut self) -> Result<()> {
        match &self.event {
            Event::Flag(done) => {
                if !done.load(Ordering::Acquire) {
                    return Err(Error::Tensor(candle_core::Error::Msg(
                        "copy event not complete".into(),
                    )));
                }
            }
            #[cfg(feature = "cuda")]
            Event::Cuda(ev) => {
                let dev = self.alloc.device().as_cuda_device()?;
                dev.cuda_stream()
                    .wait(ev)
                    .map_err(super::pinned::cuda_err)?;
            }
        }
        self.waited = true;
        Ok(())
    }

    /// The value, for use on the compute side. A use before [`wait`](Self::wait) is counted on the device
    /// ([`crate::device::DeviceUsage::unwaited_copy_uses`]); on CUDA the compute stream is then made to wait
    /// anyway.
    pub fn take(mut self) -> T {
        if !self.waited {
            self.alloc.count_unwaited_use();
            #[cfg(feature = "cuda")]
            if let Event::Cuda(_) = &self.event {
                let _ = self.wait();
            }
            // Marked, so that drop does not wait again on the host.
            self.waited = true;
        }
        self.value
            .take()
            .expect("a hand-off holds its value until taken")
    }
}

impl<T> Drop for Handoff<T> {
    fn drop(&mut self) {
        if self.waited {
            return;
        }
        // Unused: its copies may still run on the engine's stream; wait for them (this event only) before the
        // destination is freed and the lease that counts it is released.
        #[cfg(feature = "cuda")]
        if let Event::Cuda(ev) = &self.event {
            let _ = ev.synchronize();
        }
        drop(self.value.take());
    }
}

/// CUDA uploads on the engine's stream, handed to the compute stream.
///
/// Stream-ordered frees: cudarc frees a `CudaSlice` with `cuMemFreeAsync` on *the stream it holds*
/// (cudarc-0.19.10 `src/driver/safe/core.rs:866-867`, `result::free_async(self.cu_device_ptr,
/// self.stream.cu_stream)` in `impl Drop for CudaSlice`). A buffer allocated on the engine's stream would be freed
/// there, unordered with the kernels still queued on the compute stream. So each destination is allocated and
/// filled on the engine's stream, then leaked and re-wrapped as a slice *of the compute stream*
/// (`upgrade_device_ptr`): its free is queued on the compute stream, after every kernel queued before it, whichever
/// thread drops it. The compute stream waits for the copy's event before any use ([`Handoff::wait`]), and an unused
/// hand-off waits for it on the host before it is dropped, so the free also follows the copy. This relies on the
/// compute stream being one stream for every thread (`Device::new_cuda_with_stream`, asserted in tests/gpu.rs), not
/// candle's per-thread default stream (handle 0x2, which would mean "the dropping thread's stream").
#[cfg(feature = "cuda")]
pub(crate) mod cuda {
    use std::sync::Arc;

    use candle_core::cuda_backend::cudarc::driver::CudaStream;
    use candle_core::cuda_backend::CudaDevice;
    use candle_core::{CudaStorage, DType};

    use crate::error::{Error, Result};

    /// `bytes` (host, `dtype` elements) in a new device buffer filled on `copy` and owned by `dev`'s compute stream.
    /// None for a dtype this path does not carry or an empty buffer (the caller copies through candle instead).
    pub(crate) fn storage_from_bytes(
        copy: &Arc<CudaStream>,
        dev: &CudaDevice,
        bytes: &[u8],
        dtype: DType,
    ) -> Result<Option<CudaStorage>> {
        let carried = matches!(
            dtype,
            DType::U8
                | DType::U32
                | DType::I64
                | DType::F16
                | DType::BF16
                | DType::F32
                | DType::F64
        );
        if !carried || bytes.is_empty() || bytes.len() % dtype.size_in_bytes() != 0 {
            return Ok(None);
        }
        // SAFETY: every byte is written by the copy below, which the compute stream waits for before any read.
        let mut dst =
            unsafe { copy.alloc::<u8>(bytes.len()) }.map_err(driver)?;
        copy.memcpy_htod(bytes, &mut dst)
            .map_err(driver)?;
        let ptr = dst.leak();
        let cs = dev.cuda_stream();
        macro_rules! wrap {
            ($t:ty) => {{
                let n = bytes.len() / std::mem::size_of::<$t>();
                // SAFETY: `ptr` is a live allocation of exactly n elements of $t, owned from here by this slice.
                let slice = unsafe { cs.upgrade_device_ptr::<$t>(ptr, n) };
                CudaStorage::wrap_cuda_slice(slice, dev.clone())
            }};
        }
        Ok(Some(match dtype {
            DType::U8 => wrap!(u8),
            DType::U32 => wrap!(u32),
            DType::I64 => wrap!(i64),
            DType::F16 => wrap!(half::f16),
            DType::BF16 => wrap!(half::bf16),
            DType::F32 => wrap!(f32),
            _ => wrap!(f64),
        }))
    }

    /// The driver's error as candle wraps it (`CudaError::Cuda`), so the allocator's one classifier
    /// ([`crate::device::DeviceAllocator::classify`]) sees an out-of-memory as it sees one from inside an op.
    fn driver(e: candle_core::cuda_backend::cudarc::driver::DriverError) -> Error {
        Error::Tensor(candle_core::Error::Cuda(Box::new(candle_core::cuda_backend::CudaError::Cuda(e))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::DeviceSpec;

    fn emulated() -> DeviceAllocator {
        DeviceAllocator::new(&DeviceSpec::Emulated(1 << 20)).unwrap()
    }

    /// One persistent thread runs every job, in order, off the caller's thread; results come back with their events.
    #[test]
    fn jobs_run_in_order_on_one_persistent_thread() {
        let alloc = emulated();
        let engine = alloc.copy_engine().unwrap();
        let me = std::thread::current().id();
        let pending: Vec<_> = (0..20u32)
            .map(|i| {
                engine
                    .submit(move |_| Ok((i, std::thread::current().id())))
                    .unwrap()
            })
            .collect();
        let mut threads = Vec::new();
        for (i, p) in pending.into_iter().enumerate() {
            let mut h = p.recv(&alloc).unwrap();
            h.wait().unwrap();
            let (v, t) = h.take();
            assert_eq!(v, i as u32);
            threads.push(t);
        }
        assert!(threads.iter().all(|t| *t == threads[0] && *t != me));
        assert_eq!(threads[0], engine.thread_id());
        assert_eq!(engine.jobs(), 20);
        // The same engine for every caller.
        assert!(std::ptr::eq(engine, alloc.copy_engine().unwrap()));
        assert_eq!(alloc.usage().copy_jobs, 20);
        assert_eq!(alloc.usage().unwaited_copy_uses, 0);
    }

    /// The emulated device's check: a value used before its event was waited for is counted (on CUDA its kernels
    /// would read bytes not yet copied); waited, it is not.
    #[test]
    fn a_use_without_waiting_for_the_event_is_counted() {
        let alloc = emulated();
        let engine = alloc.copy_engine().unwrap();
        let h = engine.submit(|_| Ok(7u8)).unwrap().recv(&alloc).unwrap();
        assert_eq!(h.take(), 7);
        assert_eq!(alloc.usage().unwaited_copy_uses, 1);
        let mut h = engine.submit(|_| Ok(8u8)).unwrap().recv(&alloc).unwrap();
        h.wait().unwrap();
        assert_eq!(h.take(), 8);
        assert_eq!(alloc.usage().unwaited_copy_uses, 1);
        // Dropped unused: neither a use nor an error.
        drop(engine.submit(|_| Ok(9u8)).unwrap().recv(&alloc).unwrap());
        assert_eq!(alloc.usage().unwaited_copy_uses, 1);
    }

    /// A failing or panicking job reports an error to its consumer; the thread keeps serving.
    #[test]
    fn failures_come_back_and_the_thread_survives() {
        let alloc = emulated();
        let engine = alloc.copy_engine().unwrap();
        let e = engine
            .submit(|_| -> Result<u8> { Err(Error::invalid("nope")) })
            .unwrap()
            .recv(&alloc);
        assert!(matches!(e, Err(Error::InvalidArgument(_))));
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let p = engine
            .submit(|_| -> Result<u8> { panic!("job panics") })
            .unwrap()
            .recv(&alloc);
        std::panic::set_hook(prev);
        assert!(p.is_err());
        let mut h = engine.submit(|_| Ok(1u8)).unwrap().recv(&alloc).unwrap();
        h.wait().unwrap();
        assert_eq!(h.take(), 1);
    }

    /// The thread is created by the first job and ends with the allocator, after the jobs queued before.
    #[test]
    fn the_thread_stops_with_the_allocator() {
        let alloc = emulated();
        assert_eq!(alloc.usage().copy_threads_started, 0, "created lazily");
        let engine = alloc.copy_engine().unwrap();
        let token = engine.alive_token();
        let ran = Arc::new(AtomicBool::new(false));
        let r2 = ran.clone();
        let pending = engine
            .submit(move |_| {
                std::thread::sleep(std::time::Duration::from_millis(50));
                r2.store(true, Ordering::SeqCst);
                Ok(())
            })
            .unwrap();
        assert_eq!(alloc.usage().copy_threads_started, 1);
        assert!(token.upgrade().is_some());
        drop(pending);
        drop(alloc);
        assert!(
            ran.load(Ordering::SeqCst),
            "queued jobs run before it stops"
        );
        assert!(token.upgrade().is_none(), "the thread has ended");
    }
}
