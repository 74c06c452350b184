//! The device allocator: every device byte the library places goes through [`DeviceAllocator::allocate`], which
//! counts it (current, peak, by kind) and, where the device has a hard capacity, refuses past it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use serde::Serialize;

use crate::device::copy_engine::{CopyEngine, CopyLane};
use crate::device::{BlockBuffers, DeviceSpec, PinEvent, PinRegistry};
use crate::error::{Error, Result};

/// What an allocation holds (for the per-kind counters in [`DeviceUsage`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AllocKind {
    /// A resident block of weights (kept across calls).
    Weights,
    /// A streamed block (copied for one fetch, released when its `BlockWeights` drops) or a dtype cast of a block.
    Streaming,
    /// An operation's working memory (a placeholder: activations are allocated by the tensor library).
    Working,
    /// A host reservation (the host's own use of the device).
    Reservation,
    /// Bytes used by someone else (another process on a real GPU; a test on the emulated device).
    External,
}

const KINDS: usize = 5;

fn kind_index(k: AllocKind) -> usize {
    match k {
        AllocKind::Weights => 0,
        AllocKind::Streaming => 1,
        AllocKind::Working => 2,
        AllocKind::Reservation => 3,
        AllocKind::External => 4,
    }
}

/// A snapshot of the allocator's counters (bytes).
#[derive(Debug, Clone, Default, Serialize)]
pub struct DeviceUsage {
    /// The device as configured (`cpu`, `cuda:0`, `emulated:67108864`).
    pub device: String,
    /// Capacity in bytes (None = unbounded: the CPU).
    pub capacity_bytes: Option<u64>,
    /// Bytes allocated now (all kinds).
    pub current_bytes: u64,
    /// The most bytes allocated at once since creation or the last [`DeviceAllocator::reset_peak`].
    pub peak_bytes: u64,
    /// Allocations refused for lack of memory.
    pub refused_allocations: u64,
    /// Resident weights.
    pub weights_bytes: u64,
    /// Streamed blocks in flight.
    pub streaming_bytes: u64,
    /// Working-memory reservations.
    pub working_bytes: u64,
    /// Host reservations.
    pub reservation_bytes: u64,
    /// External use accounted through [`DeviceAllocator::reserve_external`].
    pub external_bytes: u64,
    /// Bytes released by the cache but still held by a running block (freed at its block boundary).
    pub retiring_bytes: u64,
    /// Allocations freed on a thread other than the ones computing with them while they ran: on CUDA such a free
    /// is not ordered after the kernels still queued on the compute stream (a use-after-free). Always 0.
    pub off_thread_frees: u64,
    /// Copy-engine results used before the compute side waited for their copy's event: on CUDA, kernels reading
    /// bytes not yet copied. Always 0.
    pub unwaited_copy_uses: u64,
    /// Copy threads started on this device: 0 until the first prefetch, then 1 (one persistent thread per device).
    pub copy_threads_started: u64,
    /// Jobs the copy thread has run (blocks copied ahead of use, including discarded ones).
    pub copy_jobs: u64,
}

#[derive(Default)]
struct State {
    current: u64,
    peak: u64,
    refused: u64,
    by_kind: [u64; KINDS],
    retiring: u64,
    off_thread_frees: u64,
    unwaited_copy_uses: u64,
    /// Injected failures at each point: allocations, activations inside ops, block uploads.
    sites: [Site; 3],
}

/// One fault-injection point: its setting, attempts since it was set, the generator's state, refusals injected.
#[derive(Default, Clone, Copy)]
struct Site {
    faults: FaultInjection,
    attempts: u64,
    rng: u64,
    injected: u64,
}

impl Site {
    fn set(&mut self, faults: FaultInjection) {
        *self = Site {
            faults,
            rng: match faults {
                FaultInjection::Rate { seed, .. } => seed,
                _ => 0,
            },
            ..Site::default()
        };
    }

    /// Count an attempt; whether it is refused.
    fn attempt(&mut self) -> bool {
        self.attempts += 1;
        let refuse = draw(self.faults, self.attempts, &mut self.rng);
        self.injected += refuse as u64;
        refuse
    }
}

/// Where a fault is injected ([`DeviceAllocator::set_faults_at`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultSite {
    /// [`DeviceAllocator::allocate`]: every byte the cache places (weights, streamed blocks, working memory,
    /// reservations).
    Allocation = 0,
    /// [`DeviceAllocator::activation`]: an op's output, at the entry of linear, conv2d, attention and group_norm.
    Activation = 1,
    /// [`DeviceAllocator::upload`]: the device copy of a block of weights (resident or streamed), after its bytes
    /// were counted: the device itself (the driver, on CUDA) has no room for it.
    Upload = 2,
}

/// Whether attempt number `attempts` (1-based) is refused under `faults`, drawing from `rng` for a rate.
fn draw(faults: FaultInjection, attempts: u64, rng: &mut u64) -> bool {
    match faults {
        FaultInjection::Off => false,
        FaultInjection::Nth(n) => attempts == n,
        FaultInjection::Rate { probability, .. } => {
            // splitmix64: a uniform draw in [0, 1).
            *rng = rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = *rng;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            (((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64) < probability
        }
    }
}

/// Allocations to refuse on purpose, as if the device were out of memory: every allocation point (weights,
/// streamed blocks, working memory, reservations; emulated and CUDA alike, since all go through
/// [`DeviceAllocator::allocate`]) must then either recover or fail cleanly with its accounting intact.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum FaultInjection {
    /// No injected failures.
    #[default]
    Off,
    /// Refuse the Nth allocation attempt after this is set (1-based), once.
    Nth(u64),
    /// Refuse each attempt with this probability, drawn from a generator seeded with `seed` (reproducible).
    Rate { probability: f64, seed: u64 },
}

/// The threads computing with a set of allocations now (a locked model's compute threads): freeing one of them on
/// any other thread while the set is not empty breaks stream order, and is counted in
/// [`DeviceUsage::off_thread_frees`].
#[derive(Debug, Default)]
pub struct ComputeThreads(Mutex<Vec<std::thread::ThreadId>>);

impl ComputeThreads {
    /// The calling thread starts computing with the allocations; returns it, for [`leave`](Self::leave).
    pub fn enter(&self) -> std::thread::ThreadId {
        let me = std::thread::current().id();
        lock(&self.0).push(me);
        me
    }
    /// Thread `t` stops (once per [`enter`](Self::enter)).
    pub fn leave(&self, t: std::thread::ThreadId) {
        let mut v = lock(&self.0);
        if let Some(i) = v.iter().position(|x| *x == t) {
            v.swap_remove(i);
        }
    }
    /// Whether some thread computes with the allocations now.
    pub fn running(&self) -> bool {
        !lock(&self.0).is_empty()
    }
    /// Whether the calling thread is one of those computing with the allocations.
    pub fn is_current(&self) -> bool {
        lock(&self.0).contains(&std::thread::current().id())
    }
}

struct Inner {
    /// The device's copy thread, started by the first job; dropped (joined) with the allocator.
    copy: OnceLock<CopyEngine>,
    copy_start: Mutex<()>,
    spec: DeviceSpec,
    device: Device,
    capacity: Option<u64>,
    state: Mutex<State>,
    changed: Condvar,
    block_buffers: Option<Arc<BlockBuffers>>,
    /// Host memory registered (pinned) for copies to this device.
    pins: PinRegistry,
    /// CUDA: the pool our calls allocate from (see `device::pool`).
    #[cfg(feature = "cuda")]
    pool: Option<super::pool::OwnPool>,
}

/// While held, the device's current memory pool is the library's own (CUDA; see `device::pool`): candle's
/// allocations during a call of ours come from it. Re-entrant across our threads; the last one dropped, also on a
/// panic, gives the device its previous current pool back. Nothing off CUDA.
pub struct PoolRoute {
    #[cfg(feature = "cuda")]
    inner: Option<Arc<Inner>>,
}

impl Drop for PoolRoute {
    fn drop(&mut self) {
        #[cfg(feature = "cuda")]
        if let Some(p) = self.inner.as_ref().and_then(|i| i.pool.as_ref()) {
            p.leave();
        }
    }
}

/// The one allocator of a device: counts every byte placed on it and refuses past its capacity. Cheap to clone
/// (shared).
#[derive(Clone)]
pub struct DeviceAllocator {
    inner: Arc<Inner>,
    /// Set in the view a copy job uses ([`DeviceAllocator::on_lane`]): on CUDA, uploads go on the copy engine's
    /// stream instead of the compute stream.
    #[cfg(feature = "cuda")]
    lane: Option<Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>>,
}

/// Bytes counted on a device; they return to the allocator when this drops.
pub struct Allocation {
    inner: Arc<Inner>,
    bytes: u64,
    kind: AllocKind,
    retiring: AtomicBool,
    users: Option<Arc<ComputeThreads>>,
}

impl std::fmt::Debug for Allocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Allocation({} bytes, {:?})", self.bytes, self.kind)
    }
}

impl Allocation {
    /// The bytes this allocation counts.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
    /// What it holds.
    pub fn kind(&self) -> AllocKind {
        self.kind
    }
    /// Tie the allocation to the threads that compute with it (checked when it is freed).
    pub fn used_by(mut self, users: Arc<ComputeThreads>) -> Self {
        self.users = Some(users);
        self
    }
    /// Mark the bytes as released by their owner but still in use until the last holder drops (a block being
    /// computed on): they show as `retiring_bytes` until then.
    pub fn mark_retiring(&self) {
        if !self.retiring.swap(true, Ordering::SeqCst) {
            lock(&self.inner.state).retiring += self.bytes;
        }
    }
}

impl Drop for Allocation {
    fn drop(&mut self) {
        let off_thread = self
            .users
            .as_ref()
            .is_some_and(|u| u.running() && !u.is_current());
        {
            let mut s = lock(&self.inner.state);
            s.off_thread_frees += off_thread as u64;
            s.current -= self.bytes;
            s.by_kind[kind_index(self.kind)] -= self.bytes;
            if self.retiring.load(Ordering::SeqCst) {
                s.retiring -= self.bytes;
            }
        }
        self.inner.changed.notify_all();
    }
}

/// A copy of a host tensor into new host memory — the emulated device's "upload". Large tensors are copied in parallel
/// chunks over the rayon pool into a zero-initialised buffer (calloc'd, so its pages are first touched, and faulted
/// in, by the copying threads rather than by one zeroing pass): a streamed block costs the memory bandwidth of both
/// cores instead of one thread's copy plus page faults.
fn emulated_copy(t: &Tensor) -> Result<Tensor> {
    const CHUNK: usize = 1 << 18; // elements (1 MiB of f32)
    fn par_copy<T: Copy + Default + Send + Sync>(src: &[T]) -> Vec<T> {
        let mut dst = vec![T::default(); src.len()];
        crate::device::copy_chunked(&mut dst, src, true);
        dst
    }
    if t.elem_count() < 4 * CHUNK || !t.is_contiguous() {
        return Ok(t.copy()?);
    }
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        return Ok(t.copy()?);
    };
    let Some((a, b)) = layout.contiguous_offsets() else {
        return Ok(t.copy()?);
    };
    let shape = t.shape().clone();
    let dev = t.device();
    use candle_core::CpuStorage as S;
    let out = match cpu {
        S::F32(v) => Tensor::from_vec(par_copy(&v[a..b]), shape, dev)?,
        S::F16(v) => Tensor::from_vec(par_copy(&v[a..b]), shape, dev)?,
        S::BF16(v) => Tensor::from_vec(par_copy(&v[a..b]), shape, dev)?,
        _ => {
            drop(storage);
            return Ok(t.copy()?);
        }
    };
    Ok(out)
}

/// The emulated device's upload of a large aligned byte slice: a parallel copy (as [`emulated_copy`]); None for
/// small or unaligned data (then candle's plain copy).
fn emulated_from_bytes(data: &[u8], dtype: DType, shape: &[usize]) -> Result<Option<Tensor>> {
    fn typed<T: Copy + Default + Send + Sync + candle_core::WithDType>(
        data: &[u8],
        shape: &[usize],
    ) -> Result<Option<Tensor>> {
        if data.as_ptr() as usize % std::mem::align_of::<T>() != 0 || data.len() % std::mem::size_of::<T>() != 0 {
            return Ok(None);
        }
        // SAFETY: aligned and a whole number of plain-number elements.
        let src = unsafe {
            std::slice::from_raw_parts(data.as_ptr() as *const T, data.len() / std::mem::size_of::<T>())
        };
        let mut dst = vec![T::default(); src.len()];
        crate::device::copy_chunked(&mut dst, src, true);
        Ok(Some(Tensor::from_vec(dst, shape, &Device::Cpu)?))
    }
    if data.len() < 4 << 20 {
        return Ok(None);
    }
    match dtype {
        DType::F32 => typed::<f32>(data, shape),
        DType::F16 => typed::<half::f16>(data, shape),
        DType::BF16 => typed::<half::bf16>(data, shape),
        DType::U8 => typed::<u8>(data, shape),
        _ => Ok(None),
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl DeviceAllocator {
    /// Open the device `spec` (resolving `auto`). `cuda:N` needs a `cuda` build (else `Unsupported`).
    pub fn new(spec: &DeviceSpec) -> Result<Self> {
        let spec = spec.resolve();
        let (device, capacity) = match &spec {
            DeviceSpec::Cpu | DeviceSpec::Auto => (Device::Cpu, None),
            DeviceSpec::Emulated(cap) => (Device::Cpu, Some(*cap)),
            DeviceSpec::Cuda(n) => open_cuda(*n)?,
        };
        // Our own pool where the device has memory pools (cudarc allocates with cuMemAllocAsync only then,
        // core.rs:1628-1632; without them every allocation is a synchronous cuMemAlloc and there is nothing to route).
        #[cfg(feature = "cuda")]
        let pool = match &device {
            Device::Cuda(d) if d.cuda_stream().context().has_async_alloc() => {
                Some(super::pool::OwnPool::create(d.cuda_stream().context())?)
            }
            _ => None,
        };
        let emulated = matches!(spec, DeviceSpec::Emulated(_));
        let block_buffers = emulated.then(BlockBuffers::new);
        let pins = PinRegistry::new(&device, emulated);
        Ok(Self {
            inner: Arc::new(Inner {
                copy: OnceLock::new(),
                copy_start: Mutex::new(()),
                spec,
                device,
                capacity,
                state: Mutex::new(State::default()),
                changed: Condvar::new(),
                block_buffers,
                pins,
                #[cfg(feature = "cuda")]
                pool,
            }),
            #[cfg(feature = "cuda")]
            lane: None,
        })
    }

    /// The device's copy engine (one persistent thread; started here by the first caller). On CUDA it gets its own
    /// stream, forked from the compute stream's context.
    pub fn copy_engine(&self) -> Result<&CopyEngine> {
        if let Some(e) = self.inner.copy.get() {
            return Ok(e);
        }
        let _one = lock(&self.inner.copy_start);
        if let Some(e) = self.inner.copy.get() {
            return Ok(e);
        }
        let lane = CopyLane {
            #[cfg(feature = "cuda")]
            stream: match &self.inner.device {
                Device::Cuda(d) => Some(d.cuda_stream().fork().map_err(super::pinned::cuda_err)?),
                _ => None,
            },
        };
        let _ = self.inner.copy.set(CopyEngine::start(lane)?);
        Ok(self.inner.copy.get().expect("set above"))
    }

    /// This allocator as a copy job on `lane` uses it: the same counters, with uploads
    /// ([`copy_to_device`](Self::copy_to_device), [`tensor_from_bytes`](Self::tensor_from_bytes), and the upload
    /// before a [`cast`](Self::cast)) issued on the engine's stream on CUDA. Elsewhere the same allocator.
    pub fn on_lane(&self, lane: &CopyLane) -> DeviceAllocator {
        let _ = lane;
        DeviceAllocator {
            inner: self.inner.clone(),
            #[cfg(feature = "cuda")]
            lane: lane.stream.clone(),
        }
    }

    /// On the copy engine's view, a CUDA upload of `bytes` (elements of `dtype`, `shape`) on the engine's stream,
    /// owned by the compute stream (see `copy_engine::cuda`). None when this is not such a view or the dtype is not
    /// carried that way (the caller then copies through candle, on the compute stream).
    #[cfg(feature = "cuda")]
    fn lane_upload(&self, bytes: &[u8], dtype: DType, shape: &[usize]) -> Result<Option<Tensor>> {
        let (Some(lane), Device::Cuda(dev)) = (&self.lane, &self.inner.device) else {
            return Ok(None);
        };
        let storage =
            match crate::device::copy_engine::cuda::storage_from_bytes(lane, dev, bytes, dtype) {
                Ok(Some(s)) => s,
                Ok(None) => return Ok(None),
                Err(e) => return Err(self.classify(e, bytes.len() as u64)),
            };
        Ok(Some(Tensor::from_storage(
            candle_core::Storage::Cuda(storage),
            shape,
            candle_core::op::BackpropOp::none(),
            false,
        )))
    }

    /// [`lane_upload`](Self::lane_upload) of a contiguous CPU tensor's bytes.
    #[cfg(feature = "cuda")]
    fn lane_upload_tensor(&self, t: &Tensor) -> Result<Option<Tensor>> {
        if self.lane.is_none() || !t.device().is_cpu() {
            return Ok(None);
        }
        let (storage, layout) = t.storage_and_layout();
        let (candle_core::Storage::Cpu(cpu), Some((a, b))) =
            (&*storage, layout.contiguous_offsets())
        else {
            return Ok(None);
        };
        fn bytes<T>(v: &[T]) -> &[u8] {
            // SAFETY: a view of plain numbers as their bytes.
            unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
        }
        use candle_core::CpuStorage as S;
        let raw = match cpu {
            S::U8(v) => bytes(&v[a..b]),
            S::U32(v) => bytes(&v[a..b]),
            S::I64(v) => bytes(&v[a..b]),
            S::F16(v) => bytes(&v[a..b]),
            S::BF16(v) => bytes(&v[a..b]),
            S::F32(v) => bytes(&v[a..b]),
            S::F64(v) => bytes(&v[a..b]),
            _ => return Ok(None),
        };
        self.lane_upload(raw, t.dtype(), t.dims())
    }

    /// CUDA: an event that completes when every upload this allocator has queued so far is done — recorded on the
    /// copy engine's stream in the engine's view ([`on_lane`](Self::on_lane)), else on the compute stream. Whoever
    /// must know when an asynchronous upload has finished reading its host source (a pinned buffer to reuse or
    /// unregister) records it right after the upload, with the allocator (view) that made it. None elsewhere.
    #[cfg(feature = "cuda")]
    pub fn upload_event(
        &self,
    ) -> Result<Option<candle_core::cuda_backend::cudarc::driver::CudaEvent>> {
        let stream = match (&self.lane, &self.inner.device) {
            (Some(lane), _) => lane.clone(),
            (None, Device::Cuda(d)) => d.cuda_stream(),
            _ => return Ok(None),
        };
        stream
            .record_event(None)
            .map(Some)
            .map_err(super::pinned::cuda_err)
    }

    /// Count a copy-engine result used before its event was waited for (see [`DeviceUsage::unwaited_copy_uses`]).
    pub(crate) fn count_unwaited_use(&self) {
        lock(&self.inner.state).unwaited_copy_uses += 1;
    }

    /// The pool of reusable buffers streamed blocks are written into (the emulated device only; on CUDA, blocks
    /// are allocated from the driver's stream-ordered pool instead).
    pub fn block_buffers(&self) -> Option<&Arc<BlockBuffers>> {
        self.inner.block_buffers.as_ref()
    }

    /// Our CUDA memory pool (None off CUDA).
    #[cfg(feature = "cuda")]
    pub(crate) fn own_pool(&self) -> Option<&super::pool::OwnPool> {
        self.inner.pool.as_ref()
    }

    /// Make our memory pool the device's current one until the returned guard drops (CUDA; see `device::pool` for
    /// why and the caveat). A model lock holds one; hosts measuring ops outside a lock may take one too.
    pub fn route_pool(&self) -> Result<PoolRoute> {
        #[cfg(feature = "cuda")]
        if let Some(p) = self.inner.pool.as_ref() {
            p.enter()?;
            return Ok(PoolRoute { inner: Some(self.inner.clone()) });
        }
        Ok(PoolRoute {
            #[cfg(feature = "cuda")]
            inner: None,
        })
    }

    /// Whether our pool is the device's current one now (false off CUDA).
    pub fn pool_is_routed(&self) -> bool {
        #[cfg(feature = "cuda")]
        if let Some(p) = self.inner.pool.as_ref() {
            return p.is_current().unwrap_or(false);
        }
        false
    }

    /// The pinned host memory of this device (registrations, the cap, events).
    pub fn pins(&self) -> &PinRegistry {
        &self.inner.pins
    }

    /// Set the cap on pinned host bytes (None = no pinning: `pin_memory: false`). What is pinned stays pinned; later
    /// registrations see the new cap. Ignored on the CPU device (nothing is copied to a device there).
    pub fn set_pinned_cap(&self, cap: Option<u64>) {
        self.inner.pins.set_cap(cap)
    }

    /// The cap on pinned host bytes (None = pinning disabled or the CPU device).
    pub fn pinned_cap(&self) -> Option<u64> {
        self.inner.pins.cap()
    }

    /// Host bytes registered (pinned) now: RAM copies and staging slots, whole pages.
    pub fn pinned_bytes(&self) -> u64 {
        self.inner.pins.bytes()
    }

    /// The most host bytes pinned at once.
    pub fn pinned_peak(&self) -> u64 {
        self.inner.pins.peak()
    }

    /// The last registrations, unregistrations and frees of host arenas, in order (see [`PinEvent`]).
    pub fn pin_events(&self) -> Vec<PinEvent> {
        self.inner.pins.events()
    }

    /// Host arenas freed while still registered (must be 0: the arena unregisters first).
    pub fn pin_violations(&self) -> u64 {
        self.inner.pins.violations()
    }

    /// The device as resolved.
    pub fn spec(&self) -> &DeviceSpec {
        &self.inner.spec
    }

    /// The compute device (the CPU for `cpu` and `emulated:SIZE`).
    pub fn device(&self) -> &Device {
        &self.inner.device
    }

    /// Whether the device is CUDA.
    pub fn is_cuda(&self) -> bool {
        self.inner.device.is_cuda()
    }

    /// Capacity in bytes: the emulated size, the CUDA total memory, None for the CPU.
    pub fn capacity(&self) -> Option<u64> {
        self.inner.capacity
    }

    /// Bytes allocated now.
    pub fn current(&self) -> u64 {
        lock(&self.inner.state).current
    }

    /// Peak bytes since creation or the last [`reset_peak`](Self::reset_peak).
    pub fn peak(&self) -> u64 {
        lock(&self.inner.state).peak
    }

    /// Allocations refused so far.
    pub fn refused(&self) -> u64 {
        lock(&self.inner.state).refused
    }

    /// Restart peak tracking from the current bytes.
    pub fn reset_peak(&self) {
        let mut s = lock(&self.inner.state);
        s.peak = s.current;
    }

    /// Bytes allocated now of one kind.
    pub fn used(&self, kind: AllocKind) -> u64 {
        lock(&self.inner.state).by_kind[kind_index(kind)]
    }

    /// Bytes released by their owner but still held by a running block.
    pub fn retiring(&self) -> u64 {
        lock(&self.inner.state).retiring
    }

    /// Capacity minus bytes allocated (None on the CPU).
    pub fn free(&self) -> Option<u64> {
        self.inner
            .capacity
            .map(|c| c.saturating_sub(self.current()))
    }

    /// All counters at once.
    pub fn usage(&self) -> DeviceUsage {
        let s = lock(&self.inner.state);
        DeviceUsage {
            device: self.inner.spec.to_string(),
            capacity_bytes: self.inner.capacity,
            current_bytes: s.current,
            peak_bytes: s.peak,
            refused_allocations: s.refused,
            weights_bytes: s.by_kind[0],
            streaming_bytes: s.by_kind[1],
            working_bytes: s.by_kind[2],
            reservation_bytes: s.by_kind[3],
            external_bytes: s.by_kind[4],
            retiring_bytes: s.retiring,
            off_thread_frees: s.off_thread_frees,
            unwaited_copy_uses: s.unwaited_copy_uses,
            copy_threads_started: self.inner.copy.get().is_some() as u64,
            copy_jobs: self.inner.copy.get().map_or(0, |e| e.jobs()),
        }
    }

    /// Refuse allocations on purpose from now on (tests and CI; see [`FaultInjection`]). Resets both counts of
    /// [`fault_counts`](Self::fault_counts). The same as [`set_faults_at`](Self::set_faults_at) with
    /// [`FaultSite::Allocation`].
    pub fn set_faults(&self, faults: FaultInjection) {
        self.set_faults_at(FaultSite::Allocation, faults)
    }

    /// Allocation attempts since [`set_faults`](Self::set_faults) (or creation), and the refusals it injected.
    pub fn fault_counts(&self) -> (u64, u64) {
        self.fault_counts_at(FaultSite::Allocation)
    }

    /// Fail the point `site` on purpose from now on (tests and CI): every injected failure looks like a device
    /// out-of-memory there, so each must end in recovery or a clean OUT_OF_DEVICE_MEMORY. Resets the site's counts.
    pub fn set_faults_at(&self, site: FaultSite, faults: FaultInjection) {
        lock(&self.inner.state).sites[site as usize].set(faults);
    }

    /// Attempts at `site` since its faults were set (or creation), and the failures injected there.
    pub fn fault_counts_at(&self, site: FaultSite) -> (u64, u64) {
        let s = lock(&self.inner.state).sites[site as usize];
        (s.attempts, s.injected)
    }

    /// The tensor library's device-OOM error for `bytes` at `site`, when its fault injection says so (counted as
    /// a refusal); Ok otherwise.
    fn inject_at(&self, site: FaultSite, bytes: u64) -> Result<()> {
        let mut s = lock(&self.inner.state);
        if s.sites[site as usize].attempt() {
            s.refused += 1;
            return Err(Error::Tensor(crate::device::oom::device_oom_error(bytes)));
        }
        Ok(())
    }

    /// The activation allocation point: an op on this device is about to allocate its output of `bytes`. Counted
    /// at [`FaultSite::Activation`]; fails, when that site's injection ([`set_faults_at`](Self::set_faults_at)) says so,
    /// with the tensor library's own device-OOM error ([`crate::device::oom::device_oom_error`]), so it takes the
    /// path a real one takes: through [`classify`](Self::classify) to `OutOfDeviceMemory` and recovery. The bytes
    /// are not counted (the tensor library allocates activations; the lock's working memory stands for them).
    pub fn activation(&self, bytes: u64) -> Result<()> {
        self.inject_at(FaultSite::Activation, bytes)
    }

    /// The upload point: a block of `bytes` (already counted) is about to be copied to the device. Fails, when
    /// [`FaultSite::Upload`]'s injection says so, as the device itself would when it has no room for the copy
    /// (on CUDA, the driver inside the copy): `OutOfDeviceMemory` through [`classify`](Self::classify).
    pub fn upload(&self, bytes: u64) -> Result<()> {
        self.inject_at(FaultSite::Upload, bytes).map_err(|e| self.classify(e, bytes))
    }

    /// Bytes the device really has for a new allocation now: the driver's free bytes on CUDA (plus what our pool
    /// keeps free for reuse), capacity − allocated on the emulated device, free RAM on the CPU.
    pub fn available_now(&self) -> u64 {
        #[cfg(feature = "cuda")]
        if let Device::Cuda(_) = &self.inner.device {
            let free = self.mem_info().map_or(0, |(f, _)| f);
            let kept = crate::device::pool_stats(self)
                .ok()
                .flatten()
                .map_or(0, |p| p.reserved.saturating_sub(p.used));
            return free.saturating_add(kept);
        }
        match self.free() {
            Some(f) => f,
            None => crate::system::ram_stats().free_bytes,
        }
    }

    /// `e` as `OutOfDeviceMemory` when it is a device out-of-memory from anywhere (the allocator's own refusal
    /// passes unchanged; a tensor-library error is tested by [`crate::device::oom::oom_request`]), with needed =
    /// the failed request when the error carries it, else `needed` (the caller's best figure: the op's request or
    /// the plan's working bytes), and available = [`available_now`](Self::available_now). Any other error is
    /// returned unchanged. The one place device OOMs are recognised.
    pub fn classify(&self, e: Error, needed: u64) -> Error {
        let Error::Tensor(t) = &e else {
            return e;
        };
        match crate::device::oom::oom_request(t) {
            Some(request) => Error::OutOfDeviceMemory {
                device: self.inner.spec.to_string(),
                needed_bytes: request.unwrap_or(needed),
                available_bytes: self.available_now(),
            },
            None => e,
        }
    }

    /// Count `bytes` of `kind` on the device, or refuse with `OutOfDeviceMemory { needed, available }` (and count
    /// the refusal) when they exceed the capacity or an injected fault says so.
    pub fn allocate(&self, bytes: u64, kind: AllocKind) -> Result<Allocation> {
        let mut s = lock(&self.inner.state);
        if s.sites[FaultSite::Allocation as usize].attempt() {
            s.refused += 1;
            return Err(Error::OutOfDeviceMemory {
                device: self.inner.spec.to_string(),
                needed_bytes: bytes,
                available_bytes: self
                    .inner
                    .capacity
                    .map_or(0, |c| c.saturating_sub(s.current)),
            });
        }
        // Past the capacity, or past what the counters can hold (a host asking for u64::MAX on the CPU).
        let cap = self.inner.capacity.unwrap_or(u64::MAX);
        if s.current.checked_add(bytes).is_none_or(|after| after > cap) {
            s.refused += 1;
            return Err(Error::OutOfDeviceMemory {
                device: self.inner.spec.to_string(),
                needed_bytes: bytes,
                available_bytes: cap.saturating_sub(s.current),
            });
        }
        s.current += bytes;
        s.by_kind[kind_index(kind)] += bytes;
        s.peak = s.peak.max(s.current);
        drop(s);
        Ok(Allocation {
            inner: self.inner.clone(),
            bytes,
            kind,
            retiring: AtomicBool::new(false),
            users: None,
        })
    }

    /// Count bytes used by someone other than the cache (another program on the GPU; on the emulated device, a
    /// test's stand-in for one). The cache sees them at its next planning and works around them.
    pub fn reserve_external(&self, bytes: u64) -> Result<Allocation> {
        self.allocate(bytes, AllocKind::External)
    }

    /// Wait until an allocation is freed or `timeout` passes.
    pub fn wait_for_free(&self, timeout: Duration) {
        let s = lock(&self.inner.state);
        let _ = self.inner.changed.wait_timeout(s, timeout);
    }

    /// Wake everyone waiting in [`wait_for_free`](Self::wait_for_free) (the budget changed).
    pub fn notify(&self) {
        self.inner.changed.notify_all();
    }

    /// Free and total device memory as the driver reports it (CUDA), or the allocator's view (emulated); None on
    /// the CPU.
    pub fn mem_info(&self) -> Option<(u64, u64)> {
        #[cfg(feature = "cuda")]
        if let Device::Cuda(d) = &self.inner.device {
            return d
                .cuda_stream()
                .context()
                .mem_get_info()
                .ok()
                .map(|(f, t)| (f as u64, t as u64));
        }
        self.inner
            .capacity
            .map(|c| (c.saturating_sub(self.current()), c))
    }

    /// Whether `bytes` are really free now for another allocator (a host's `cudaMalloc`), making them so where it
    /// can. On CUDA: drain the compute stream to this point (an event recorded on it and waited for by the host,
    /// not a device or context synchronise: the frees queued before it have then returned their blocks to our
    /// pool), give the driver back what our pool keeps beyond what is live and the bytes asked for
    /// (`cuMemPoolTrimTo`), and compare the driver's free bytes with `bytes`: `Ok((true, free))` when they fit,
    /// `Ok((false, free))` when they do not yet. Elsewhere the allocator's counters already say it: true, with
    /// what the device has.
    pub fn settle_free(&self, bytes: u64) -> Result<(bool, u64)> {
        #[cfg(feature = "cuda")]
        if let (Device::Cuda(d), Some(pool)) = (&self.inner.device, self.inner.pool.as_ref()) {
            let ev = d.cuda_stream().record_event(None).map_err(super::pinned::cuda_err)?;
            ev.synchronize().map_err(super::pinned::cuda_err)?;
            let s = pool.stats()?;
            // Keep what is live and as much of the reuse cache as leaves `bytes` to give back.
            pool.trim_to(s.used.max(s.reserved.saturating_sub(bytes)))?;
            let free = self.mem_info().map_or(0, |(f, _)| f);
            return Ok((free >= bytes, free));
        }
        let _ = bytes;
        Ok((true, self.free().unwrap_or(u64::MAX)))
    }

    /// Device bytes in use by others, from the driver (CUDA): used (total − free, `cuMemGetInfo`) minus the bytes
    /// of our own pool (`RESERVED_MEM_CURRENT`: live weights, streamed blocks, activations and the freed blocks the
    /// pool keeps, which are ours to reuse; see `device::pool`) minus host reservations (the host's own use,
    /// which the cache counts separately). Unlike used − our counters, it neither counts kept pool bytes as another
    /// program's nor working memory that is only a placeholder as ours. None off CUDA (or if the driver does not
    /// answer).
    pub fn external_from_driver(&self) -> Option<u64> {
        if !self.is_cuda() {
            return None;
        }
        let (free, total) = self.mem_info()?;
        let pool = crate::device::pool_reserved_bytes(self).ok()??;
        Some(
            total
                .saturating_sub(free)
                .saturating_sub(pool)
                .saturating_sub(self.used(AllocKind::Reservation)),
        )
    }

    /// A device copy of the host tensor `t` (a deep copy on the emulated device, `to_device` on CUDA, shared storage
    /// on the CPU). The caller accounts the bytes.
    pub fn copy_to_device(&self, t: &Tensor) -> Result<Tensor> {
        let bytes = (t.elem_count() * t.dtype().size_in_bytes()) as u64;
        match &self.inner.spec {
            DeviceSpec::Emulated(_) => emulated_copy(t),
            DeviceSpec::Cpu | DeviceSpec::Auto => Ok(t.clone()),
            DeviceSpec::Cuda(_) => {
                #[cfg(feature = "cuda")]
                if let Some(d) = self.lane_upload_tensor(t)? {
                    return Ok(d);
                }
                t.to_device(&self.inner.device).map_err(|e| self.classify(e.into(), bytes))
            }
        }
    }

    /// A device tensor built from host bytes (`data` in `dtype`, row-major `shape`). The caller accounts the bytes.
    /// On CUDA a copy from a pinned [`crate::device::HostArena`] is asynchronous: the caller records it there
    /// ([`crate::device::HostArena::note_read`], with this allocator, so the event lands on the stream that copied).
    pub fn tensor_from_bytes(&self, data: &[u8], dtype: DType, shape: &[usize]) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let Some(d) = self.lane_upload(data, dtype, shape)? {
            return Ok(d);
        }
        if matches!(self.inner.spec, DeviceSpec::Emulated(_)) {
            if let Some(t) = emulated_from_bytes(data, dtype, shape)? {
                return Ok(t);
            }
        }
        Tensor::from_raw_buffer(data, dtype, shape, &self.inner.device).map_err(|e| self.classify(e.into(), data.len() as u64))
    }

    /// `t` cast to `dtype` on the device (a new tensor unless the dtype already matches). The caller accounts it.
    pub fn cast(&self, t: &Tensor, dtype: DType) -> Result<Tensor> {
        let bytes = (t.elem_count() * dtype.size_in_bytes()) as u64;
        // The cast is a kernel on the compute stream: on the copy engine's view, `t` was just uploaded on the
        // engine's stream, so the compute stream first waits for that upload (the GPU waits, not the host).
        #[cfg(feature = "cuda")]
        if let (Some(_), Device::Cuda(dev)) = (&self.lane, &self.inner.device) {
            if t.dtype() != dtype {
                if let Some(ev) = self.upload_event()? {
                    dev.cuda_stream()
                        .wait(&ev)
                        .map_err(super::pinned::cuda_err)?;
                }
            }
        }
        t.to_dtype(dtype).map_err(|e| self.classify(e.into(), bytes))
    }
}

#[cfg(feature = "cuda")]
fn open_cuda(n: usize) -> Result<(Device, Option<u64>)> {
    // An explicit compute stream, the same for every thread: frees from any thread are queued on it, in order after
    // the kernels before them (candle's `new_cuda` would use the per-thread default stream, handle 0x2, where a
    // free on another thread goes to that thread's stream). tests/gpu.rs asserts what this relies on.
    let device = Device::new_cuda_with_stream(n)?;
    let total = match &device {
        Device::Cuda(d) => d
            .cuda_stream()
            .context()
            .mem_get_info()
            .ok()
            .map(|(_, t)| t as u64),
        _ => None,
    };
    Ok((device, total))
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(n: usize) -> Result<(Device, Option<u64>)> {
    // The process's backend choice says why the CUDA build is not running this (no driver, not installed, ...).
    let why = crate::backend::current().map_or_else(String::new, |c| format!("; backend {c}"));
    Err(Error::unsupported(format!(
        "device cuda:{n}: this build has no CUDA support (build with --features cuda, or install liblowvram_cuda.so \
         beside liblowvram.so){why}"
    )))
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    /// Large tensors take the parallel copy: same values, same dtype and shape, a separate buffer.
    #[test]
    fn emulated_copy_is_exact_for_large_and_small_tensors() {
        for n in [1000usize, (1 << 20) + 12_345] {
            let t = Tensor::arange(0u32, n as u32, &Device::Cpu)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            let t = (t * 0.37).unwrap().reshape((1, n)).unwrap();
            for dtype in [DType::F32, DType::F16, DType::BF16] {
                let src = t.to_dtype(dtype).unwrap();
                let copy = super::emulated_copy(&src).unwrap();
                assert_eq!(copy.dtype(), dtype);
                assert_eq!(copy.dims(), src.dims());
                let (a, b) = (
                    src.to_dtype(DType::F32).unwrap(),
                    copy.to_dtype(DType::F32).unwrap(),
                );
                let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
                let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
                assert!(
                    a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
                    "{n} {dtype:?}"
                );
                let (sa, _) = src.storage_and_layout();
                let (sb, _) = copy.storage_and_layout();
                assert!(
                    !std::ptr::eq(&*sa, &*sb),
                    "the copy must not share the source's storage"
                );
            }
        }
    }
}
