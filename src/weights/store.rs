//! A memory-mapped safetensors checkpoint: every tensor's place in the file, grouped into blocks by
//! [`block_key`], an optional RAM copy in the storage dtype, and reads through a small staging ring when there is
//! no RAM copy (`keep_ram_copy_of_weights: false`).

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;
use serde::Serialize;

use crate::device::{BlockBuffer, DeviceAllocator, PinnedHost};
use crate::error::{Error, Result};
use crate::weights::source::{block_key, WeightLayout};

/// Where a tensor's bytes are now (the best copy).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TensorLocation {
    /// Only in the memory-mapped file.
    File,
    /// In the RAM copy (and the file).
    Ram,
    /// Resident on the device.
    Device,
}

/// One tensor of the checkpoint.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    /// Full checkpoint name.
    pub name: String,
    /// Name relative to its block (`conv1.weight`).
    pub rel_name: String,
    /// Index of its block in [`WeightStore::blocks`].
    pub block: usize,
    /// Dtype in the file.
    pub file_dtype: DType,
    /// Dtype kept in RAM and on the device.
    pub storage_dtype: DType,
    /// Shape.
    pub shape: Vec<usize>,
    offset: usize,
    len: usize,
    /// Stored as the transpose of `shape` (2-D): transposed as it is read.
    transposed: bool,
}

impl TensorInfo {
    /// Elements.
    pub fn elem_count(&self) -> usize {
        self.shape.iter().product()
    }
    /// Bytes in the storage dtype.
    pub fn storage_bytes(&self) -> u64 {
        (self.elem_count() * self.storage_dtype.size_in_bytes()) as u64
    }
}

/// One block: the unit of residency and transfer.
#[derive(Debug, Clone)]
pub struct BlockInfo {
    /// The block key (`down_blocks.0.resnets.1`).
    pub key: String,
    /// Indices into [`WeightStore::tensors`].
    pub tensors: Vec<usize>,
    /// Bytes in the storage dtype (what residency costs and what a stream moves).
    pub storage_bytes: u64,
    /// Bytes in the compute dtype (what the block occupies on the device once converted).
    pub compute_bytes: u64,
}

/// A small pool of host buffers that streamed blocks pass through when there is no RAM copy. Host bytes it holds
/// stay below `slots × largest block`.
pub struct StagingRing {
    slots: usize,
    state: Mutex<RingState>,
    cv: Condvar,
}

#[derive(Default)]
struct RingState {
    free: Vec<Vec<u8>>,
    out: usize,
    bytes: u64,
    peak: u64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl StagingRing {
    /// A ring of `slots` buffers (grown on demand to the largest block read).
    pub fn new(slots: usize) -> Arc<Self> {
        Arc::new(Self {
            slots: slots.max(1),
            state: Mutex::new(RingState::default()),
            cv: Condvar::new(),
        })
    }
    /// Number of buffers.
    pub fn slots(&self) -> usize {
        self.slots
    }
    /// Host bytes held by the ring now.
    pub fn bytes(&self) -> u64 {
        lock(&self.state).bytes
    }
    /// The most host bytes the ring has held.
    pub fn peak(&self) -> u64 {
        lock(&self.state).peak
    }

    fn acquire(self: &Arc<Self>, len: usize) -> StagingSlot {
        let mut s = lock(&self.state);
        loop {
            if let Some(buf) = s.free.pop() {
                s.out += 1;
                let mut buf = buf;
                let before = buf.capacity();
                buf.clear();
                buf.resize(len, 0);
                s.bytes += (buf.capacity() - before) as u64;
                s.peak = s.peak.max(s.bytes);
                return StagingSlot {
                    ring: self.clone(),
                    buf: Some(buf),
                };
            }
            if s.out + s.free.len() < self.slots {
                s.free.push(Vec::new());
                continue;
            }
            s = self.cv.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }
}

struct StagingSlot {
    ring: Arc<StagingRing>,
    buf: Option<Vec<u8>>,
}

impl Drop for StagingSlot {
    fn drop(&mut self) {
        if let Some(b) = self.buf.take() {
            let mut s = lock(&self.ring.state);
            s.out -= 1;
            s.free.push(b);
            drop(s);
            self.ring.cv.notify_one();
        }
    }
}

/// A memory-mapped safetensors file, its tensors grouped into blocks, and an optional RAM copy.
pub struct WeightStore {
    path: PathBuf,
    mmap: Mmap,
    tensors: Vec<TensorInfo>,
    blocks: Vec<BlockInfo>,
    index: HashMap<String, usize>,
    compute_dtype: DType,
    ram: Mutex<Option<Arc<Vec<HashMap<String, Tensor>>>>>,
    /// The RAM copy's registration as pinned memory (CUDA, `pin_memory`); dropped before the copy.
    pinned: Mutex<Option<PinnedHost>>,
    /// Bytes read from the mapping so far (RAM copies and streams without one).
    read: AtomicU64,
}

/// A span's dtype, if the store can hold it.
fn dtype_of_candle(d: DType, name: &str) -> Result<DType> {
    match d {
        DType::F32 | DType::F16 | DType::BF16 => Ok(d),
        other => Err(Error::unsupported(format!("tensor {name}: dtype {other:?} (supported: F32, F16, BF16)"))),
    }
}

/// A known extra that is not a weight: the integer `position_ids` buffer older transformers exports of CLIP text
/// encoders carry (`text_model.embeddings.position_ids`, SD 1.5's among them). Skipped (DECISIONS: known extras).
fn is_index_buffer(name: &str, d: safetensors::Dtype) -> bool {
    name.ends_with("embeddings.position_ids") && matches!(d, safetensors::Dtype::I64 | safetensors::Dtype::I32)
}

fn dtype_of(d: safetensors::Dtype, name: &str) -> Result<DType> {
    match d {
        safetensors::Dtype::F32 => Ok(DType::F32),
        safetensors::Dtype::F16 => Ok(DType::F16),
        safetensors::Dtype::BF16 => Ok(DType::BF16),
        other => Err(Error::unsupported(format!(
            "tensor {name}: dtype {other:?} (supported: F32, F16, BF16)"
        ))),
    }
}

/// The bytes of a contiguous CPU tensor's storage.
fn cpu_bytes<'a>(
    storage: &'a candle_core::Storage,
    layout: &candle_core::Layout,
) -> Result<&'a [u8]> {
    fn bytes<T>(v: &[T], a: usize, b: usize) -> &[u8] {
        let v = &v[a..b];
        // SAFETY: plain numbers, read as bytes.
        unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
    }
    let (candle_core::Storage::Cpu(cpu), Some((a, b))) = (storage, layout.contiguous_offsets())
    else {
        return Err(Error::unsupported(
            "a RAM copy that is not a contiguous CPU tensor".to_string(),
        ));
    };
    use candle_core::CpuStorage as S;
    Ok(match cpu {
        S::F32(v) => bytes(v, a, b),
        S::F16(v) => bytes(v, a, b),
        S::BF16(v) => bytes(v, a, b),
        _ => {
            return Err(Error::unsupported(
                "a RAM copy of a dtype other than f32, f16, bf16".to_string(),
            ))
        }
    })
}

/// Convert `src` (elements of `from`) into `dst` (elements of `to`), little-endian, any alignment. One loop per
/// dtype pair, so the per-element work is just the conversion (this runs once per resident block and once per
/// streamed block's arrival).
fn convert_into(src: &[u8], from: DType, to: DType, dst: &mut [u8]) {
    if from == to {
        dst.copy_from_slice(src);
        return;
    }
    fn run<const A: usize, const B: usize>(
        src: &[u8],
        dst: &mut [u8],
        f: impl Fn([u8; A]) -> [u8; B],
    ) {
        for (s, d) in src.chunks_exact(A).zip(dst.chunks_exact_mut(B)) {
            d.copy_from_slice(&f(s.try_into().expect("chunk of A bytes")));
        }
    }
    use half::{bf16, f16};
    match (from, to) {
        (DType::F16, DType::F32) => run(src, dst, |b: [u8; 2]| {
            f16::from_le_bytes(b).to_f32().to_le_bytes()
        }),
        (DType::BF16, DType::F32) => run(src, dst, |b: [u8; 2]| {
            bf16::from_le_bytes(b).to_f32().to_le_bytes()
        }),
        (DType::F32, DType::F16) => run(src, dst, |b: [u8; 4]| {
            f16::from_f32(f32::from_le_bytes(b)).to_le_bytes()
        }),
        (DType::F32, DType::BF16) => run(src, dst, |b: [u8; 4]| {
            bf16::from_f32(f32::from_le_bytes(b)).to_le_bytes()
        }),
        (DType::F16, _) => run(src, dst, |b: [u8; 2]| {
            bf16::from_f32(f16::from_le_bytes(b).to_f32()).to_le_bytes()
        }),
        _ => run(src, dst, |b: [u8; 2]| {
            f16::from_f32(bf16::from_le_bytes(b).to_f32()).to_le_bytes()
        }),
    }
}

/// [`convert_into`] split over the rayon pool for large blocks (a resident placement or a synchronous fetch).
fn convert_par(src: &[u8], from: DType, to: DType, dst: &mut [u8], parallel: bool) {
    const CHUNK: usize = 1 << 18; // elements
    let n = src.len() / from.size_in_bytes();
    if !parallel || n < 4 * CHUNK || from == to {
        return convert_into(src, from, to, dst);
    }
    use rayon::prelude::*;
    src.par_chunks(CHUNK * from.size_in_bytes())
        .zip(dst.par_chunks_mut(CHUNK * to.size_in_bytes()))
        .for_each(|(s, d)| convert_into(s, from, to, d));
}

impl WeightStore {
    /// Map `path` and validate its header, every tensor under its stored name in the generic block partition
    /// ([`block_key`]). `storage` = the dtype kept in RAM and on the device (None = the file's); `compute` = the
    /// dtype fetches return. A corrupt or truncated file gives [`Error::Format`].
    pub fn open(path: &Path, storage: Option<DType>, compute: DType) -> Result<Self> {
        Self::open_with(path, &WeightLayout::whole(block_key), storage, compute)
    }

    /// [`Self::open`] with a family's block rule and, for a component of a single-file checkpoint, the spans of
    /// its tensors in the file (checked against the file's bounds and dtypes).
    pub fn open_with(path: &Path, layout: &WeightLayout, storage: Option<DType>, compute: DType) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        if len < 8 {
            return Err(Error::format(format!(
                "{}: {len} bytes, too small for a safetensors header",
                path.display()
            )));
        }
        // SAFETY: the file is opened read-only; like every mmap-based loader we rely on it not being truncated
        // while mapped (documented for hosts).
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let st = safetensors::SafeTensors::deserialize(&mmap)
            .map_err(|e| Error::format(format!("{}: invalid safetensors: {e}", path.display())))?;
        let base = mmap.as_ptr() as usize;
        let mut raw: Vec<(String, DType, Vec<usize>, usize, usize, bool)> = Vec::new();
        if let Some(spans) = &layout.spans {
            for s in spans.iter() {
                dtype_of_candle(s.dtype, &s.name)?;
                let expect = s.shape.iter().product::<usize>() * s.dtype.size_in_bytes();
                if s.bytes.end > mmap.len() || s.bytes.len() != expect || (s.transposed && s.shape.len() != 2) {
                    return Err(Error::format(format!(
                        "{}: tensor {} spans bytes {:?}, expected {expect} bytes within the file's {}",
                        path.display(),
                        s.name,
                        s.bytes,
                        mmap.len()
                    )));
                }
                raw.push((s.name.clone(), s.dtype, s.shape.clone(), s.bytes.start, s.bytes.len(), s.transposed));
            }
        } else {
            for (name, view) in st.tensors() {
                if is_index_buffer(&name, view.dtype()) {
                    continue;
                }
                let dt = dtype_of(view.dtype(), &name)?;
                let data = view.data();
                let expect = view.shape().iter().product::<usize>() * dt.size_in_bytes();
                if data.len() != expect {
                    return Err(Error::format(format!(
                        "{}: tensor {name} has {} bytes, expected {expect}",
                        path.display(),
                        data.len()
                    )));
                }
                raw.push((name, dt, view.shape().to_vec(), data.as_ptr() as usize - base, data.len(), false));
            }
        }
        drop(st);
        raw.sort_by_key(|r| r.3);
        let mut tensors = Vec::with_capacity(raw.len());
        let mut blocks: Vec<BlockInfo> = Vec::new();
        let mut index = HashMap::new();
        for (name, file_dtype, shape, offset, len, transposed) in raw {
            let key = (layout.rule)(&name).to_string();
            let rel_name = name
                .strip_prefix(&key)
                .map(|r| r.trim_start_matches('.'))
                .unwrap_or(&name)
                .to_string();
            let block = *index.entry(key.clone()).or_insert_with(|| {
                blocks.push(BlockInfo {
                    key,
                    tensors: Vec::new(),
                    storage_bytes: 0,
                    compute_bytes: 0,
                });
                blocks.len() - 1
            });
            let storage_dtype = storage.unwrap_or(file_dtype);
            let info = TensorInfo {
                name,
                rel_name,
                block,
                file_dtype,
                storage_dtype,
                shape,
                offset,
                len,
                transposed,
            };
            let b = &mut blocks[block];
            b.storage_bytes += info.storage_bytes();
            b.compute_bytes += (info.elem_count() * compute.size_in_bytes()) as u64;
            b.tensors.push(tensors.len());
            tensors.push(info);
        }
        Ok(Self {
            path: path.to_path_buf(),
            mmap,
            tensors,
            blocks,
            index,
            compute_dtype: compute,
            ram: Mutex::new(None),
            pinned: Mutex::new(None),
            read: AtomicU64::new(0),
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// All tensors, in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }
    /// All blocks, in file order of their first tensor.
    pub fn blocks(&self) -> &[BlockInfo] {
        &self.blocks
    }
    /// Index of block `key`.
    pub fn block_index(&self, key: &str) -> Option<usize> {
        self.index.get(key).copied()
    }
    /// Bytes of all weights in the storage dtype.
    pub fn total_bytes(&self) -> u64 {
        self.blocks.iter().map(|b| b.storage_bytes).sum()
    }
    /// The dtype fetches return.
    pub fn compute_dtype(&self) -> DType {
        self.compute_dtype
    }
    /// Bytes of the mapping (the file size).
    pub fn mapped_bytes(&self) -> u64 {
        self.mmap.len() as u64
    }
    /// Bytes read from the file (through the mapping) since it was opened: RAM copies and streams without one.
    pub fn file_bytes_read(&self) -> u64 {
        self.read.load(Ordering::Relaxed)
    }
    /// The mapped bytes of tensor `t` in its shape's row-major order, counted as read (a copy only for a tensor
    /// stored transposed).
    fn file_bytes(&self, t: &TensorInfo) -> std::borrow::Cow<'_, [u8]> {
        self.read.fetch_add(t.len as u64, Ordering::Relaxed);
        let bytes = &self.mmap[t.offset..t.offset + t.len];
        if !t.transposed {
            return std::borrow::Cow::Borrowed(bytes);
        }
        // Stored [cols, rows] row-major; the model reads [rows, cols].
        let (rows, cols, e) = (t.shape[0], t.shape[1], t.file_dtype.size_in_bytes());
        let mut out = vec![0u8; bytes.len()];
        for r in 0..rows {
            for c in 0..cols {
                let (dst, src) = ((r * cols + c) * e, (c * rows + r) * e);
                out[dst..dst + e].copy_from_slice(&bytes[src..src + e]);
            }
        }
        std::borrow::Cow::Owned(out)
    }

    /// Whether a RAM copy is held.
    pub fn has_ram_copy(&self) -> bool {
        lock(&self.ram).is_some()
    }
    /// Bytes of the RAM copy (0 without one).
    pub fn ram_bytes(&self) -> u64 {
        if self.has_ram_copy() {
            self.total_bytes()
        } else {
            0
        }
    }

    /// Read every tensor into a RAM copy in the storage dtype (no-op if held). Returns the bytes read.
    pub fn load_ram_copy(&self) -> Result<u64> {
        if self.has_ram_copy() {
            return Ok(0);
        }
        let mut copy = Vec::with_capacity(self.blocks.len());
        let mut buf = Vec::new();
        for b in &self.blocks {
            let mut m = HashMap::new();
            for &ti in &b.tensors {
                let t = &self.tensors[ti];
                buf.resize(t.storage_bytes() as usize, 0);
                convert_into(&self.file_bytes(t), t.file_dtype, t.storage_dtype, &mut buf);
                m.insert(
                    t.rel_name.clone(),
                    Tensor::from_raw_buffer(&buf, t.storage_dtype, &t.shape, &Device::Cpu)?,
                );
            }
            copy.push(m);
        }
        *lock(&self.ram) = Some(Arc::new(copy));
        Ok(self.total_bytes())
    }

    /// Register the RAM copy as pinned host memory on `alloc`'s device (CUDA; elsewhere nothing happens), so
    /// streamed blocks cross at DMA speed and a prefetch overlaps compute. Returns the bytes pinned now.
    pub fn pin_ram_copy(&self, alloc: &DeviceAllocator) -> Result<u64> {
        let Some(ram) = lock(&self.ram).clone() else {
            return Ok(0);
        };
        let mut pinned = lock(&self.pinned);
        if pinned.is_none() {
            *pinned = PinnedHost::register(alloc, ram.iter().flat_map(|m| m.values()))?;
        }
        Ok(pinned.as_ref().map_or(0, |p| p.bytes()))
    }

    /// Host bytes of the RAM copy registered as pinned memory.
    pub fn pinned_bytes(&self) -> u64 {
        lock(&self.pinned).as_ref().map_or(0, |p| p.bytes())
    }

    /// Drop the RAM copy (unpinning it first); returns the bytes released.
    pub fn drop_ram_copy(&self) -> u64 {
        drop(lock(&self.pinned).take());
        let had = lock(&self.ram).take().is_some();
        if had {
            self.total_bytes()
        } else {
            0
        }
    }

    /// Block `b` converted to `dtype` into one reusable buffer of the device's pool (the emulated device; see
    /// [`crate::device::BlockBuffers`]) in one pass from the RAM copy or the mapping: its tensors are views into the
    /// buffer, which must outlive them. None when the device has no pool or the block is empty (then use
    /// [`Self::block_to_device`]). `parallel` splits large copies over the rayon pool (synchronous fetches); a
    /// prefetch copies on its own thread.
    pub fn block_to_buffer(
        &self,
        b: usize,
        alloc: &DeviceAllocator,
        parallel: bool,
        dtype: DType,
    ) -> Result<Option<(HashMap<String, Tensor>, BlockBuffer)>> {
        let Some(pool) = alloc.block_buffers() else {
            return Ok(None);
        };
        let block = &self.blocks[b];
        if block.tensors.is_empty() {
            return Ok(None);
        }
        let elems: usize = block
            .tensors
            .iter()
            .map(|&ti| self.tensors[ti].elem_count())
            .sum();
        let buf = pool.take(dtype, elems)?;
        let ram = lock(&self.ram).clone();
        let mut out = HashMap::with_capacity(block.tensors.len());
        let mut at = 0usize;
        for &ti in &block.tensors {
            let t = &self.tensors[ti];
            let n = t.elem_count() * dtype.size_in_bytes();
            match ram.as_ref().and_then(|r| r[b].get(&t.rel_name)) {
                Some(src) => {
                    let (storage, layout) = src.storage_and_layout();
                    let bytes = cpu_bytes(&storage, layout)?;
                    if t.storage_dtype == dtype {
                        buf.write(at, n, |dst| {
                            crate::device::copy_chunked(dst, bytes, parallel)
                        })?;
                    } else {
                        buf.write(at, n, |dst| {
                            convert_par(bytes, t.storage_dtype, dtype, dst, parallel)
                        })?;
                    }
                }
                None => {
                    let src = self.file_bytes(t);
                    buf.write(at, n, |dst| {
                        convert_par(&src, t.file_dtype, dtype, dst, parallel)
                    })?;
                }
            }
            out.insert(t.rel_name.clone(), buf.view(at, &t.shape)?);
            at += t.elem_count();
        }
        Ok(Some((out, buf)))
    }

    /// Copy block `b` to the device of `alloc`, converted to `dtype`: from the RAM copy when held, else from the
    /// mapping through `ring`. On CUDA a RAM copy crosses in the storage dtype (pinned, half the bytes for fp16) and
    /// is converted on the device, so the storage-dtype copy is held until the conversion is done (the plan's
    /// `lease`/`place`); elsewhere the conversion runs on the host as the bytes are copied. The caller has already
    /// accounted the bytes with the allocator.
    pub fn block_to_device(
        &self,
        b: usize,
        alloc: &DeviceAllocator,
        ring: &Arc<StagingRing>,
        dtype: DType,
    ) -> Result<HashMap<String, Tensor>> {
        let block = &self.blocks[b];
        let ram = lock(&self.ram).clone();
        let mut out = HashMap::with_capacity(block.tensors.len());
        if let Some(ram) = ram {
            for (name, t) in &ram[b] {
                let d = if t.dtype() == dtype {
                    alloc.copy_to_device(t)?
                } else if alloc.is_cuda() {
                    alloc.cast(&alloc.copy_to_device(t)?, dtype)?
                } else {
                    self.host_convert(t, dtype)?
                };
                out.insert(name.clone(), d);
            }
            return Ok(out);
        }
        let bytes: usize = block
            .tensors
            .iter()
            .map(|&ti| self.tensors[ti].elem_count() * dtype.size_in_bytes())
            .sum();
        let mut slot = ring.acquire(bytes);
        let buf = slot.buf.as_mut().expect("slot holds a buffer");
        let mut at = 0usize;
        let mut spans = Vec::with_capacity(block.tensors.len());
        for &ti in &block.tensors {
            let t = &self.tensors[ti];
            let n = t.elem_count() * dtype.size_in_bytes();
            convert_par(
                &self.file_bytes(t),
                t.file_dtype,
                dtype,
                &mut buf[at..at + n],
                true,
            );
            spans.push((ti, at, n));
            at += n;
        }
        for (ti, at, n) in spans {
            let t = &self.tensors[ti];
            out.insert(
                t.rel_name.clone(),
                alloc.tensor_from_bytes(&buf[at..at + n], dtype, &t.shape)?,
            );
        }
        Ok(out)
    }

    /// A host (CPU) tensor of the RAM copy converted to `dtype` in new memory, in parallel for large tensors.
    fn host_convert(&self, t: &Tensor, dtype: DType) -> Result<Tensor> {
        fn into<T: Copy + Default + candle_core::WithDType>(
            src: &[u8],
            from: DType,
            to: DType,
            shape: &[usize],
        ) -> Result<Tensor> {
            let mut v = vec![T::default(); src.len() / from.size_in_bytes()];
            // SAFETY: plain numbers, written as bytes.
            let dst = unsafe {
                std::slice::from_raw_parts_mut(
                    v.as_mut_ptr() as *mut u8,
                    std::mem::size_of_val(&v[..]),
                )
            };
            convert_par(src, from, to, dst, true);
            Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
        }
        let (storage, layout) = t.storage_and_layout();
        let src = cpu_bytes(&storage, layout)?;
        match dtype {
            DType::F32 => into::<f32>(src, t.dtype(), dtype, t.dims()),
            DType::F16 => into::<half::f16>(src, t.dtype(), dtype, t.dims()),
            DType::BF16 => into::<half::bf16>(src, t.dtype(), dtype, t.dims()),
            other => Err(Error::unsupported(format!(
                "converting weights to {other:?}"
            ))),
        }
    }
}
