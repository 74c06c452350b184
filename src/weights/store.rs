//! A memory-mapped safetensors checkpoint: every tensor's place in the file, grouped into blocks by
//! [`block_key`], an optional RAM copy in the storage dtype, and reads through a small staging ring when there is
//! no RAM copy (`keep_ram_copy_of_weights: false`).
//!
//! GGUF files (recognised by their magic) and fp8 safetensors tensors open the same way. Their quantised / fp8
//! tensors keep their stored bytes in every copy — RAM, pinned, resident on the device, streamed — as `U8` tensors,
//! so residency costs and streams move the file's bytes, never the dequantised size; a fetched block's
//! [`crate::weights::BlockWeights::get`] dequantises them on the compute device (see [`StoredTensors`]). Their dense
//! tensors (F32/F16/BF16 in a GGUF: norms, biases, small tensors) convert into the storage/compute dtypes as usual.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;
use serde::Serialize;

use super::convert::convert_par;
use crate::device::{align_up, BlockBuffer, DeviceAllocator, HostArena, NotPinned, TENSOR_ALIGN};
use crate::error::{Error, Result};
use crate::weights::format::StoredFormat;
use crate::weights::gguf::{GgufHeader, GgufKind};
use crate::weights::source::{block_key, StoredTensors, TensorSpan, WeightLayout};

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
    /// (file index, byte offset, byte length) of its parts, concatenated in order.
    parts: Vec<(usize, usize, usize)>,
    /// Stored as the transpose of `shape` (2-D): transposed as it is read.
    transposed: bool,
    /// The stored format of a tensor kept as its file bytes everywhere (GGUF quantised blocks, fp8); None for a
    /// dense tensor (converted into the storage and compute dtypes as usual).
    format: Option<StoredFormat>,
}

impl TensorInfo {
    /// Elements.
    pub fn elem_count(&self) -> usize {
        self.shape.iter().product()
    }
    /// Bytes in the storage dtype; for a tensor in a stored format, its stored bytes.
    pub fn storage_bytes(&self) -> u64 {
        match self.format {
            Some(_) => self.parts.iter().map(|p| p.2 as u64).sum(),
            None => (self.elem_count() * self.storage_dtype.size_in_bytes()) as u64,
        }
    }
    /// Bytes it takes on the device with `compute` as the compute dtype: its stored bytes for a stored format (it
    /// stays stored there and is dequantised per use), else its elements in `compute`.
    pub fn compute_bytes(&self, compute: DType) -> u64 {
        match self.format {
            Some(_) => self.storage_bytes(),
            None => (self.elem_count() * compute.size_in_bytes()) as u64,
        }
    }
    /// The stored format (GGUF quantised, fp8), or None for a dense tensor.
    pub fn stored_format(&self) -> Option<StoredFormat> {
        self.format
    }
    /// The dtype of its RAM and device copies when fetched in `dtype`: `U8` bytes for a stored format.
    fn held_dtype(&self, dtype: DType) -> DType {
        if self.format.is_some() {
            DType::U8
        } else {
            dtype
        }
    }
    /// The shape of its RAM and device copies: `[stored bytes]` for a stored format.
    fn held_shape(&self) -> Vec<usize> {
        match self.format {
            Some(_) => vec![self.storage_bytes() as usize],
            None => self.shape.clone(),
        }
    }
    /// Bytes of its copy fetched in `dtype`.
    fn held_bytes(&self, dtype: DType) -> usize {
        match self.format {
            Some(_) => self.storage_bytes() as usize,
            None => self.elem_count() * dtype.size_in_bytes(),
        }
    }
}

/// One block: the unit of residency and transfer.
#[derive(Debug, Clone)]
pub struct BlockInfo {
    /// The block key (`down_blocks.0.resnets.1`).
    pub key: String,
    /// Indices into [`WeightStore::tensors`].
    pub tensors: Vec<usize>,
    /// Bytes in the storage dtype (what residency costs and what a stream moves); tensors in a stored format (GGUF
    /// quantised, fp8) count their stored bytes.
    pub storage_bytes: u64,
    /// Bytes in the compute dtype (what the block occupies on the device once converted); tensors in a stored
    /// format count their stored bytes too (they stay stored on the device and are dequantised per use).
    pub compute_bytes: u64,
}

/// A small pool of page-aligned host buffers ([`HostArena`]s) that blocks pass through when there is no RAM copy:
/// a block is read from the mapping into a slot in large copies, and its tensors cross to the device from there
/// (pinned on CUDA when `pin_memory` and the cap allow, so they are DMAs). Host bytes it holds stay below
/// `slots × largest block` (rounded up to whole pages).
pub struct StagingRing {
    slots: usize,
    /// Whether new slots are pinned (`pin_memory`).
    pin: std::sync::atomic::AtomicBool,
    state: Mutex<RingState>,
    cv: Condvar,
}

#[derive(Default)]
struct RingState {
    free: Vec<HostArena>,
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
            pin: std::sync::atomic::AtomicBool::new(true),
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
    /// Pin slots made from now on (`pin_memory`), within the device's cap.
    pub fn set_pin(&self, pin: bool) {
        self.pin.store(pin, Ordering::Relaxed);
    }
    /// A slot of at least `len` bytes, waiting while all slots are in use. A free slot too small is replaced (it is
    /// unregistered and freed after the device's reads of it); a reused one is handed out only once the device has
    /// finished reading its previous contents.
    fn acquire(self: &Arc<Self>, alloc: &DeviceAllocator, len: usize) -> Result<StagingSlot> {
        let mut s = lock(&self.state);
        loop {
            if let Some(i) = s.free.iter().position(|a| a.len() >= len) {
                let arena = s.free.swap_remove(i);
                s.out += 1;
                drop(s);
                arena.wait_reads();
                return Ok(StagingSlot { ring: self.clone(), arena: Some(arena) });
            }
            if s.out + s.free.len() < self.slots || !s.free.is_empty() {
                // Room for a new slot, or a free one too small: replace it (the smallest first). It is dropped
                // outside the lock: that waits for the device's reads of it.
                let mut stale = None;
                if s.out + s.free.len() >= self.slots {
                    let (i, _) = s.free.iter().enumerate().min_by_key(|(_, a)| a.len()).expect("not empty");
                    let old = s.free.swap_remove(i);
                    s.bytes -= old.allocated() as u64;
                    stale = Some(old);
                }
                s.out += 1;
                drop(s);
                drop(stale);
                let made = HostArena::new(alloc, len).map(|mut a| {
                    let _ = a.pin(self.pin.load(Ordering::Relaxed));
                    a
                });
                let mut s = lock(&self.state);
                return match made {
                    Ok(arena) => {
                        s.bytes += arena.allocated() as u64;
                        s.peak = s.peak.max(s.bytes);
                        Ok(StagingSlot { ring: self.clone(), arena: Some(arena) })
                    }
                    Err(e) => {
                        s.out -= 1;
                        drop(s);
                        self.cv.notify_one();
                        Err(e)
                    }
                };
            }
            s = self.cv.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }
}

struct StagingSlot {
    ring: Arc<StagingRing>,
    arena: Option<HostArena>,
}

impl StagingSlot {
    fn arena(&mut self) -> &mut HostArena {
        self.arena.as_mut().expect("present until drop")
    }
}

impl Drop for StagingSlot {
    fn drop(&mut self) {
        if let Some(a) = self.arena.take() {
            let mut s = lock(&self.ring.state);
            s.out -= 1;
            s.free.push(a);
            drop(s);
            self.ring.cv.notify_one();
        }
    }
}

/// A memory-mapped safetensors (or GGUF) file, its tensors grouped into blocks, and an optional RAM copy.
pub struct WeightStore {
    path: PathBuf,
    /// The mapped files: the path itself, or the shards its index lists.
    mmaps: Vec<Mmap>,
    tensors: Vec<TensorInfo>,
    blocks: Vec<BlockInfo>,
    index: HashMap<String, usize>,
    /// Per block, its tensors in a stored format (what `BlockWeights::get` dequantises), None when it has none.
    stored: Vec<Option<Arc<StoredTensors>>>,
    /// A GGUF file's `general.architecture` (`flux`, `sd1`, `t5encoder`, ...).
    architecture: Option<String>,
    compute_dtype: DType,
    /// The RAM copy; shared with the copies reading it, so it is freed (and unpinned) only after the last one.
    ram: Mutex<Option<Arc<RamCopy>>>,
    /// Held while a RAM copy is read: a second reader waits for the first's copy instead of reading the file again.
    ram_read: Mutex<()>,
    /// Bytes read from the mapping so far (RAM copies and streams without one).
    read: AtomicU64,
    /// Copies made from the mapping so far (one per run of tensors lying back to back in the file, else one per
    /// tensor).
    copies: AtomicU64,
}

/// The RAM copy of every tensor in its storage dtype.
enum RamCopy {
    /// The CPU device: candle tensors, which its resident blocks share (nothing is copied to a device, so nothing is
    /// pinned).
    Tensors(Vec<HashMap<String, Tensor>>),
    /// A device weights are copied to: one page-aligned arena, pinned as a whole when allowed; tensor `i` of the
    /// store at `spans[i]` (offset, bytes), each offset a multiple of [`TENSOR_ALIGN`].
    Arena { arena: HostArena, spans: Vec<(usize, usize)> },
}

/// A piece of a block read from the mapping: a run of tensors lying back to back in one file and held as stored
/// (one copy), or one tensor to convert, transpose or gather from parts.
enum Piece {
    Run { file: usize, off: usize, len: usize },
    Convert(usize),
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

/// A safetensors tensor's dtype as held (U8 bytes for fp8) and its stored format (fp8 stays as stored).
fn dtype_of(d: safetensors::Dtype, name: &str) -> Result<(DType, Option<StoredFormat>)> {
    match d {
        safetensors::Dtype::F32 => Ok((DType::F32, None)),
        safetensors::Dtype::F16 => Ok((DType::F16, None)),
        safetensors::Dtype::BF16 => Ok((DType::BF16, None)),
        safetensors::Dtype::F8_E4M3 => Ok((DType::U8, Some(StoredFormat::F8E4M3))),
        safetensors::Dtype::F8_E5M2 => Ok((DType::U8, Some(StoredFormat::F8E5M2))),
        other => Err(Error::unsupported(format!(
            "tensor {name}: dtype {other:?} (supported: F32, F16, BF16, F8_E4M3, F8_E5M2)"
        ))),
    }
}

/// ComfyUI's "scaled fp8" checkpoints multiply each fp8 weight by a per-tensor `scale_weight` (and mark the file with
/// a `scaled_fp8` tensor); reading their weights unscaled would be silently wrong, so they are refused by name.
fn refuse_scaled_fp8<'a>(path: &Path, names: impl Iterator<Item = &'a str>) -> Result<()> {
    for n in names {
        if n.ends_with("scale_weight") || n.ends_with("scaled_fp8") {
            return Err(Error::unsupported(format!(
                "{}: tensor {n}: ComfyUI \"scaled fp8\" checkpoints (per-tensor scale_weight) are not supported; use \
                 an unscaled fp8 (e4m3fn / e5m2), GGUF or bf16 file",
                path.display()
            )));
        }
    }
    Ok(())
}

/// An error of a GGUF header, naming the file.
fn in_file(path: &Path, e: Error) -> Error {
    match e {
        Error::Format(m) => Error::format(format!("{}: {m}", path.display())),
        Error::Unsupported(m) => Error::unsupported(format!("{}: {m}", path.display())),
        e => e,
    }
}

/// The stored format of span `s`: that of the GGUF tensor(s) its parts lie in (all of one quantised type, each part
/// whole blocks of its tensor), or fp8 for an `F8E4M3` span of a safetensors file; None for a dense span (checked
/// against its dtype as before).
fn span_format(gguf: Option<&GgufHeader>, s: &TensorSpan) -> Result<Option<StoredFormat>> {
    let Some(h) = gguf else {
        return Ok((s.dtype == DType::F8E4M3).then_some(StoredFormat::F8E4M3));
    };
    let mut found: Option<Option<StoredFormat>> = None;
    for p in &s.parts {
        let within = h.tensors.iter().find(|t| t.bytes.start <= p.bytes.start && p.bytes.end <= t.bytes.end);
        let f = match within.map(|t| (t.kind, t.bytes.start)) {
            Some((GgufKind::Stored(f), start)) => {
                let bb = f.block_bytes();
                if (p.bytes.start - start) % bb != 0 || p.bytes.len() % bb != 0 {
                    return Err(Error::format(format!(
                        "tensor {}: part {:?} does not hold whole {}-byte {} blocks",
                        s.name,
                        p.bytes,
                        bb,
                        f.name()
                    )));
                }
                Some(f)
            }
            _ => None,
        };
        if found.is_some_and(|g| g != f) {
            return Err(Error::format(format!("tensor {}: its parts lie in tensors of different GGUF types", s.name)));
        }
        found = Some(f);
    }
    Ok(found.flatten())
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

/// Map one safetensors file, checking it is long enough for a header (the header itself is validated by its reader).
fn map_safetensors(path: &Path) -> Result<Mmap> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    if len < 8 {
        return Err(Error::format(format!("{}: {len} bytes, too small for a safetensors header", path.display())));
    }
    // SAFETY: the file is opened read-only; like every mmap-based loader we rely on it not being truncated while
    // mapped (documented for hosts).
    unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))
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
        let files = crate::weights::shard_files(path)?;
        let mut mmaps = Vec::with_capacity(files.len());
        for f in &files {
            mmaps.push(map_safetensors(f)?);
        }
        let gguf = match mmaps.as_slice() {
            [m] if crate::weights::gguf::is_gguf(m) => Some(GgufHeader::parse(m).map_err(|e| in_file(path, e))?),
            _ => None,
        };
        type Raw = (String, DType, Vec<usize>, Vec<(usize, usize, usize)>, bool, Option<StoredFormat>);
        let mut raw: Vec<Raw> = Vec::new();
        if let Some(spans) = &layout.spans {
            for s in spans.iter() {
                let format = span_format(gguf.as_ref(), s).map_err(|e| in_file(path, e))?;
                if format.is_none() {
                    dtype_of_candle(s.dtype, &s.name)?;
                }
                let expect = match format {
                    Some(f) => f.stored_bytes(&s.shape).map_err(|e| in_file(path, e))?,
                    None => s.shape.iter().product::<usize>() * s.dtype.size_in_bytes(),
                };
                let total: usize = s.parts.iter().map(|p| p.bytes.len()).sum();
                let in_bounds = s.parts.iter().all(|p| {
                    p.bytes.start <= p.bytes.end && mmaps.get(p.file).is_some_and(|m| p.bytes.end <= m.len())
                });
                if s.parts.is_empty() || !in_bounds || total != expect || (s.transposed && (s.shape.len() != 2 || s.parts.len() != 1 || format.is_some())) {
                    return Err(Error::format(format!(
                        "{}: tensor {} spans {:?} ({total} bytes), expected {expect} bytes within the mapped files",
                        path.display(),
                        s.name,
                        s.parts,
                    )));
                }
                let parts = s.parts.iter().map(|p| (p.file, p.bytes.start, p.bytes.len())).collect();
                let dtype = if format.is_some() { DType::U8 } else { s.dtype };
                raw.push((s.name.clone(), dtype, s.shape.clone(), parts, s.transposed, format));
            }
        } else if let Some(h) = &gguf {
            // GGUF: quantised tensors kept as stored, F32/F16/BF16 dense (City96's prefix stripped by the parser).
            for t in &h.tensors {
                let (dtype, format) = match t.kind {
                    GgufKind::Dense(d) => (d, None),
                    GgufKind::Stored(f) => (DType::U8, Some(f)),
                };
                let part = (0, t.bytes.start, t.bytes.len());
                raw.push((t.name.clone(), dtype, t.shape.clone(), vec![part], false, format));
            }
        } else {
            let mut seen = std::collections::HashSet::new();
            for (fi, (mmap, f)) in mmaps.iter().zip(&files).enumerate() {
                let st = safetensors::SafeTensors::deserialize(mmap)
                    .map_err(|e| Error::format(format!("{}: invalid safetensors: {e}", f.display())))?;
                let base = mmap.as_ptr() as usize;
                for (name, view) in st.tensors() {
                    if is_index_buffer(&name, view.dtype()) {
                        continue;
                    }
                    let (dt, format) = dtype_of(view.dtype(), &name)?;
                    let data = view.data();
                    let expect = view.shape().iter().product::<usize>() * dt.size_in_bytes();
                    if data.len() != expect {
                        return Err(Error::format(format!(
                            "{}: tensor {name} has {} bytes, expected {expect}",
                            f.display(),
                            data.len()
                        )));
                    }
                    if !seen.insert(name.clone()) {
                        return Err(Error::format(format!("{}: tensor {name} is in two shards", path.display())));
                    }
                    let part = (fi, data.as_ptr() as usize - base, data.len());
                    raw.push((name, dt, view.shape().to_vec(), vec![part], false, format));
                }
            }
            if raw.iter().any(|r| r.5.is_some()) {
                refuse_scaled_fp8(path, raw.iter().map(|r| r.0.as_str()))?;
            }
        }
        raw.sort_by_key(|r| (r.3[0].0, r.3[0].1));
        let mut tensors = Vec::with_capacity(raw.len());
        let mut blocks: Vec<BlockInfo> = Vec::new();
        let mut index = HashMap::new();
        for (name, file_dtype, shape, parts, transposed, format) in raw {
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
            let storage_dtype = if format.is_some() { DType::U8 } else { storage.unwrap_or(file_dtype) };
            let info = TensorInfo {
                name,
                rel_name,
                block,
                file_dtype,
                storage_dtype,
                shape,
                parts,
                transposed,
                format,
            };
            let b = &mut blocks[block];
            b.storage_bytes += info.storage_bytes();
            b.compute_bytes += info.compute_bytes(compute);
            b.tensors.push(tensors.len());
            tensors.push(info);
        }
        let stored = blocks
            .iter()
            .map(|b| {
                let map: HashMap<String, (StoredFormat, Vec<usize>)> = b
                    .tensors
                    .iter()
                    .filter_map(|&ti| {
                        let t: &TensorInfo = &tensors[ti];
                        t.format.map(|f| (t.rel_name.clone(), (f, t.shape.clone())))
                    })
                    .collect();
                (!map.is_empty()).then(|| Arc::new(StoredTensors { dtype: compute, tensors: map }))
            })
            .collect();
        Ok(Self {
            path: path.to_path_buf(),
            mmaps,
            tensors,
            blocks,
            index,
            stored,
            architecture: gguf.as_ref().and_then(|h| h.architecture()).map(str::to_string),
            compute_dtype: compute,
            ram: Mutex::new(None),
            ram_read: Mutex::new(()),
            read: AtomicU64::new(0),
            copies: AtomicU64::new(0),
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
    /// A GGUF file's `general.architecture` (`flux`, `sd1`, `t5encoder`, ...); None for safetensors and for GGUF
    /// files without one (stable-diffusion.cpp conversions).
    pub fn gguf_architecture(&self) -> Option<&str> {
        self.architecture.as_deref()
    }
    /// Block `b`'s tensors in a stored format (GGUF quantised, fp8), which its fetched `BlockWeights` dequantise on
    /// `get` ([`crate::weights::BlockWeights::with_stored`]); None when it has none.
    pub fn stored_tensors(&self, b: usize) -> Option<Arc<StoredTensors>> {
        self.stored.get(b).cloned().flatten()
    }
    /// Bytes of the largest dequantised copy a `get` makes (elements × compute dtype size of the largest tensor in a
    /// stored format; 0 when there is none): the working memory a forward needs beside its activations.
    pub fn largest_dequantised_bytes(&self) -> u64 {
        self.tensors
            .iter()
            .filter(|t| t.format.is_some())
            .map(|t| (t.elem_count() * self.compute_dtype.size_in_bytes()) as u64)
            .max()
            .unwrap_or(0)
    }
    /// Bytes of the mappings (the file sizes).
    pub fn mapped_bytes(&self) -> u64 {
        self.mmaps.iter().map(|m| m.len() as u64).sum()
    }
    /// Bytes read from the file (through the mapping) since it was opened: RAM copies and streams without one.
    pub fn file_bytes_read(&self) -> u64 {
        self.read.load(Ordering::Relaxed)
    }
    /// The mapped bytes of tensor `t` in its shape's row-major order, counted as read (a copy only for a tensor
    /// stored transposed or made of several parts).
    fn file_bytes(&self, t: &TensorInfo) -> std::borrow::Cow<'_, [u8]> {
        let part = |&(f, off, len): &(usize, usize, usize)| &self.mmaps[f][off..off + len];
        let len: usize = t.parts.iter().map(|p| p.2).sum();
        self.read.fetch_add(len as u64, Ordering::Relaxed);
        self.copies.fetch_add(1, Ordering::Relaxed);
        if t.parts.len() > 1 {
            // One allocation and one memcpy per part (a fused qkv read on every streamed fetch without a RAM copy).
            let mut out = Vec::with_capacity(len);
            for p in &t.parts {
                out.extend_from_slice(part(p));
            }
            return std::borrow::Cow::Owned(out);
        }
        let bytes = part(&t.parts[0]);
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

    /// Copies made from the mapping since it was opened: one per run of tensors lying back to back in the file
    /// (read as stored), else one per tensor.
    pub fn file_copies(&self) -> u64 {
        self.copies.load(Ordering::Relaxed)
    }

    /// Whether a RAM copy is held.
    pub fn has_ram_copy(&self) -> bool {
        lock(&self.ram).is_some()
    }
    /// Bytes of the RAM copy's tensors in the storage dtype (0 without one).
    pub fn ram_bytes(&self) -> u64 {
        if self.has_ram_copy() {
            self.total_bytes()
        } else {
            0
        }
    }
    /// Host bytes of the RAM copy's arena (its tensors each at a multiple of [`TENSOR_ALIGN`], in whole pages); 0
    /// without one and on the CPU device (whose RAM copy is the weights it computes with).
    pub fn ram_arena_bytes(&self) -> u64 {
        match lock(&self.ram).as_deref() {
            Some(RamCopy::Arena { arena, .. }) => arena.allocated() as u64,
            _ => 0,
        }
    }
    /// Whether the RAM copy is pinned (Ok) or why not; None without a RAM copy.
    pub fn ram_pinned(&self) -> Option<std::result::Result<(), NotPinned>> {
        match lock(&self.ram).as_deref() {
            None => None,
            Some(RamCopy::Tensors(_)) => Some(Err(NotPinned::NoTransfers)),
            Some(RamCopy::Arena { arena, .. }) => Some(arena.pinned().clone()),
        }
    }
    /// Host bytes of the RAM copy registered as pinned memory (whole pages; 0 when not pinned).
    pub fn pinned_bytes(&self) -> u64 {
        match lock(&self.ram).as_deref() {
            Some(RamCopy::Arena { arena, .. }) => arena.pinned_bytes(),
            _ => 0,
        }
    }

    /// Where each tensor lies in a RAM-copy arena (offset, bytes in the storage dtype), in block order, and the
    /// bytes the arena needs.
    fn arena_spans(&self) -> (Vec<(usize, usize)>, usize) {
        let mut spans = vec![(0, 0); self.tensors.len()];
        let mut end = 0usize;
        for b in &self.blocks {
            for &ti in &b.tensors {
                let off = align_up(end, TENSOR_ALIGN);
                let n = self.tensors[ti].storage_bytes() as usize;
                spans[ti] = (off, n);
                end = off + n;
            }
        }
        (spans, end)
    }

    /// Read every tensor into a RAM copy in the storage dtype; returns whether this call read it (false: a copy was
    /// held, or another thread's read made it while this one waited for it: one read at a time per store). On a
    /// device weights are copied to, the copy is one page-aligned arena, registered as pinned memory as a whole
    /// when `pin` and the device's cap allow ([`Self::ram_pinned`] says which); on the CPU device it is the tensors
    /// it computes with. `OutOfHostMemory` when the host cannot hold it.
    pub fn load_ram_copy(&self, alloc: &DeviceAllocator, pin: bool) -> Result<bool> {
        let _reading = lock(&self.ram_read);
        if self.has_ram_copy() {
            return Ok(false);
        }
        let copy = if alloc.pins().transfers() {
            let (spans, len) = self.arena_spans();
            let mut arena = HostArena::new(alloc, len)?;
            let dst = arena.as_mut_slice();
            for (ti, t) in self.tensors.iter().enumerate() {
                let (off, n) = spans[ti];
                convert_par(&self.file_bytes(t), t.file_dtype, t.storage_dtype, &mut dst[off..off + n], true);
            }
            let _ = arena.pin(pin);
            RamCopy::Arena { arena, spans }
        } else {
            let mut maps = Vec::with_capacity(self.blocks.len());
            for b in &self.blocks {
                let mut m = HashMap::with_capacity(b.tensors.len());
                for &ti in &b.tensors {
                    let t = &self.tensors[ti];
                    let v = host_convert_bytes(&self.file_bytes(t), t.file_dtype, t.storage_dtype, &t.held_shape())?;
                    m.insert(t.rel_name.clone(), v);
                }
                maps.push(m);
            }
            RamCopy::Tensors(maps)
        };
        *lock(&self.ram) = Some(Arc::new(copy));
        Ok(true)
    }

    /// Drop the RAM copy; returns the bytes released. Its arena is unregistered and freed once no copy reads it. A
    /// pinned arena on CUDA is released on a short-lived thread: unpinning gigabytes takes a while, and the caller
    /// may hold the cache's lock (the bytes leave `pinned_bytes` when it is done).
    pub fn drop_ram_copy(&self) -> u64 {
        let Some(copy) = lock(&self.ram).take() else {
            return 0;
        };
        if matches!(&*copy, RamCopy::Arena { arena, .. } if arena.slow_to_free()) {
            // If the thread cannot start, the closure (and the copy with it) is dropped here instead.
            let _ = std::thread::Builder::new().name("lowvram-unpin".into()).spawn(move || drop(copy));
        } else {
            drop(copy);
        }
        self.total_bytes()
    }

    /// How block `b` is read from the mapping when fetched in `dtype`: runs of tensors lying back to back in one
    /// file and held as stored (one copy each), and tensors to convert, transpose or gather.
    fn pieces(&self, b: usize, dtype: DType) -> Vec<Piece> {
        let mut out: Vec<Piece> = Vec::new();
        for &ti in &self.blocks[b].tensors {
            let t = &self.tensors[ti];
            if t.parts.len() != 1 || t.transposed || t.file_dtype != t.held_dtype(dtype) {
                out.push(Piece::Convert(ti));
                continue;
            }
            let (f, o, l) = t.parts[0];
            if let Some(Piece::Run { file, off, len }) = out.last_mut() {
                if *file == f && *off + *len == o {
                    *len += l;
                    continue;
                }
            }
            out.push(Piece::Run { file: f, off: o, len: l });
        }
        out
    }

    /// Block `b` read from the mapping into `dst` in `dtype`, its tensors packed in block order.
    fn read_block(&self, b: usize, dtype: DType, dst: &mut [u8], parallel: bool) {
        let mut at = 0usize;
        for p in self.pieces(b, dtype) {
            match p {
                Piece::Run { file, off, len } => {
                    crate::device::copy_chunked(&mut dst[at..at + len], &self.mmaps[file][off..off + len], parallel);
                    self.read.fetch_add(len as u64, Ordering::Relaxed);
                    self.copies.fetch_add(1, Ordering::Relaxed);
                    at += len;
                }
                Piece::Convert(ti) => {
                    let t = &self.tensors[ti];
                    let n = t.held_bytes(dtype);
                    convert_par(&self.file_bytes(t), t.file_dtype, t.held_dtype(dtype), &mut dst[at..at + n], parallel);
                    at += n;
                }
            }
        }
    }

    /// Run `f` on tensor `ti`'s bytes in the RAM copy `ram` (storage dtype).
    fn with_ram_bytes<R>(&self, ram: &RamCopy, ti: usize, f: impl FnOnce(&[u8]) -> R) -> Result<R> {
        let t = &self.tensors[ti];
        match ram {
            RamCopy::Arena { arena, spans } => {
                let (off, n) = spans[ti];
                Ok(f(&arena.as_slice()[off..off + n]))
            }
            RamCopy::Tensors(maps) => {
                let src = maps[t.block]
                    .get(&t.rel_name)
                    .ok_or_else(|| Error::format(format!("tensor {} missing from the RAM copy", t.name)))?;
                let (storage, layout) = src.storage_and_layout();
                Ok(f(cpu_bytes(&storage, layout)?))
            }
        }
    }

    /// Block `b` converted to `dtype` into one reusable buffer of the device's pool (the emulated device; see
    /// [`crate::device::BlockBuffers`]) in one pass from the RAM copy or the mapping (in large copies: see
    /// [`Self::file_copies`]): its tensors are views into the buffer, which must outlive them. None when the device
    /// has no pool or the block is empty (then use [`Self::block_to_device`]). `parallel` splits large copies over
    /// the rayon pool (synchronous fetches); a prefetch copies on its own thread.
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
        // The pool's buffers hold one dtype: a block with stored bytes (U8) beside dense tensors takes the plain path.
        if block.tensors.is_empty() || block.tensors.iter().any(|&ti| self.tensors[ti].format.is_some()) {
            return Ok(None);
        }
        let elems: usize = block
            .tensors
            .iter()
            .map(|&ti| self.tensors[ti].elem_count())
            .sum();
        // The device's upload point (fault injection: a device with no room for the copy).
        alloc.upload((elems * dtype.size_in_bytes()) as u64)?;
        let buf = pool.take(dtype, elems)?;
        let ram = lock(&self.ram).clone();
        match ram.as_deref() {
            None => buf.write(0, elems * dtype.size_in_bytes(), |dst| self.read_block(b, dtype, dst, parallel))?,
            Some(ram) => {
                let mut at = 0usize;
                for &ti in &block.tensors {
                    let t = &self.tensors[ti];
                    let n = t.elem_count() * dtype.size_in_bytes();
                    self.with_ram_bytes(ram, ti, |bytes| {
                        buf.write(at, n, |dst| {
                            if t.storage_dtype == dtype {
                                crate::device::copy_chunked(dst, bytes, parallel)
                            } else {
                                convert_par(bytes, t.storage_dtype, dtype, dst, parallel)
                            }
                        })
                    })??;
                    at += t.elem_count();
                }
            }
        }
        let mut out = HashMap::with_capacity(block.tensors.len());
        let mut at = 0usize;
        for &ti in &block.tensors {
            let t = &self.tensors[ti];
            out.insert(t.rel_name.clone(), buf.view(at, &t.shape)?);
            at += t.elem_count();
        }
        Ok(Some((out, buf)))
    }

    /// Copy block `b` to the device of `alloc`, converted to `dtype`: from the RAM copy when held, else from the
    /// mapping through `ring` (a whole block per slot, read in large copies). On CUDA a RAM copy crosses in the
    /// storage dtype (from its pinned arena, half the bytes for fp16) and is converted on the device, so the
    /// storage-dtype copy is held until the conversion is done (the plan's `lease`/`place`); elsewhere the
    /// conversion runs on the host as the bytes are copied. The copies queued from an arena or a slot are recorded
    /// there, so it is neither unregistered nor refilled before they finish. The caller has already accounted the
    /// bytes with the allocator.
    pub fn block_to_device(
        &self,
        b: usize,
        alloc: &DeviceAllocator,
        ring: &Arc<StagingRing>,
        dtype: DType,
    ) -> Result<HashMap<String, Tensor>> {
        let block = &self.blocks[b];
        // The device's upload point (fault injection: a device with no room for the copy).
        alloc.upload(block.compute_bytes)?;
        let ram = lock(&self.ram).clone();
        let mut out = HashMap::with_capacity(block.tensors.len());
        match ram.as_deref() {
            Some(RamCopy::Tensors(maps)) => {
                for (name, t) in &maps[b] {
                    // U8 = a tensor in a stored format: it crosses and stays as stored.
                    let d = if t.dtype() == dtype || t.dtype() == DType::U8 {
                        alloc.copy_to_device(t)?
                    } else if alloc.is_cuda() {
                        alloc.cast(&alloc.copy_to_device(t)?, dtype)?
                    } else {
                        let (storage, layout) = t.storage_and_layout();
                        host_convert_bytes(cpu_bytes(&storage, layout)?, t.dtype(), dtype, t.dims())?
                    };
                    out.insert(name.clone(), d);
                }
            }
            Some(RamCopy::Arena { arena, spans }) => {
                let mut copy = || -> Result<()> {
                    for &ti in &block.tensors {
                        let t = &self.tensors[ti];
                        let (off, n) = spans[ti];
                        let bytes = &arena.as_slice()[off..off + n];
                        let held = t.storage_dtype;
                        let d = if held == dtype || held == DType::U8 {
                            alloc.tensor_from_bytes(bytes, held, &t.held_shape())?
                        } else if alloc.is_cuda() {
                            alloc.cast(&alloc.tensor_from_bytes(bytes, held, &t.held_shape())?, dtype)?
                        } else {
                            host_convert_bytes(bytes, held, dtype, &t.held_shape())?
                        };
                        out.insert(t.rel_name.clone(), d);
                    }
                    Ok(())
                };
                let r = copy();
                arena.note_read(alloc)?;
                r?;
            }
            None => {
                let bytes: usize = block.tensors.iter().map(|&ti| self.tensors[ti].held_bytes(dtype)).sum();
                let mut slot = ring.acquire(alloc, bytes)?;
                let arena = slot.arena();
                self.read_block(b, dtype, &mut arena.as_mut_slice()[..bytes], true);
                let arena: &HostArena = arena;
                let mut copy = || -> Result<()> {
                    let mut at = 0usize;
                    for &ti in &block.tensors {
                        let t = &self.tensors[ti];
                        let n = t.held_bytes(dtype);
                        let bytes = &arena.as_slice()[at..at + n];
                        out.insert(
                            t.rel_name.clone(),
                            alloc.tensor_from_bytes(bytes, t.held_dtype(dtype), &t.held_shape())?,
                        );
                        at += n;
                    }
                    Ok(())
                };
                let r = copy();
                arena.note_read(alloc)?;
                r?;
            }
        }
        Ok(out)
    }
}

/// Host bytes `src` (elements of `from`) as a new CPU tensor of `to` and `shape`, converted in parallel when large.
fn host_convert_bytes(src: &[u8], from: DType, to: DType, shape: &[usize]) -> Result<Tensor> {
    fn into<T: Copy + Default + candle_core::WithDType>(
        src: &[u8],
        from: DType,
        to: DType,
        shape: &[usize],
    ) -> Result<Tensor> {
        let mut v = vec![T::default(); src.len() / from.size_in_bytes()];
        // SAFETY: plain numbers, written as bytes.
        let dst = unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut u8, std::mem::size_of_val(&v[..])) };
        convert_par(src, from, to, dst, true);
        Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
    }
    match to {
        DType::F32 => into::<f32>(src, from, to, shape),
        DType::F16 => into::<half::f16>(src, from, to, shape),
        DType::BF16 => into::<half::bf16>(src, from, to, shape),
        DType::U8 if from == DType::U8 => into::<u8>(src, from, to, shape),
        other => Err(Error::unsupported(format!("converting weights to {other:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{page_size, DeviceSpec, PinEvent};

    /// The ring holds at most `slots` page-aligned arenas, reuses one that fits, replaces the smallest free one when a
    /// larger block needs a slot and all are made, waits while all are out, and unregisters each before freeing it.
    #[test]
    fn staging_ring_reuses_grows_and_bounds_its_slots() {
        let alloc = DeviceAllocator::new(&DeviceSpec::Emulated(1 << 30)).unwrap();
        alloc.set_pinned_cap(Some(1 << 30));
        let ring = StagingRing::new(2);
        let page = page_size();
        let a = ring.acquire(&alloc, 100).unwrap();
        let b = ring.acquire(&alloc, 3 * page).unwrap();
        let (a_base, b_base) = (a.arena.as_ref().unwrap().base(), b.arena.as_ref().unwrap().base());
        assert_eq!((a_base % page, b_base % page), (0, 0));
        assert_eq!(ring.bytes(), 4 * page as u64);
        assert_eq!(alloc.pinned_bytes(), 4 * page as u64, "slots are pinned");
        // Both out: a third acquire waits until one comes back.
        let r2 = ring.clone();
        let al2 = alloc.clone();
        let waiter = std::thread::spawn(move || r2.acquire(&al2, 50).map(|s| s.arena.as_ref().unwrap().base()));
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!waiter.is_finished(), "a third slot must wait");
        drop(a);
        assert_eq!(waiter.join().unwrap().unwrap(), a_base, "the small free slot fits and is reused");
        drop(b);
        // A block larger than every slot: the smallest free one is replaced (unregistered, then freed).
        let c = ring.acquire(&alloc, 5 * page).unwrap();
        assert!(ring.bytes() <= 2 * 5 * page as u64);
        assert_eq!(ring.peak(), 8 * page as u64);
        drop(c);
        drop(ring);
        assert_eq!(alloc.pinned_bytes(), 0);
        assert_eq!(alloc.pin_violations(), 0);
        let ev = alloc.pin_events();
        let at = |e: PinEvent| ev.iter().position(|x| *x == e).unwrap();
        assert!(at(PinEvent::Unregister { base: a_base }) < at(PinEvent::Free { base: a_base }));
        assert!(at(PinEvent::Unregister { base: b_base }) < at(PinEvent::Free { base: b_base }));
    }
}
