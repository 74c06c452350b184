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

use crate::device::{BlockBuffer, DeviceAllocator, PinnedHost};
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
                    Tensor::from_raw_buffer(&buf, t.storage_dtype, &t.held_shape(), &Device::Cpu)?,
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
        // The pool's buffers hold one dtype: a block with stored bytes (U8) beside dense tensors takes the plain path.
        if block.tensors.is_empty() || block.tensors.iter().any(|&ti| self.tensors[ti].format.is_some()) {
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
                // U8 = a tensor in a stored format: it crosses and stays as stored.
                let d = if t.dtype() == dtype || t.dtype() == DType::U8 {
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
        let bytes: usize = block.tensors.iter().map(|&ti| self.tensors[ti].held_bytes(dtype)).sum();
        let mut slot = ring.acquire(bytes);
        let buf = slot.buf.as_mut().expect("slot holds a buffer");
        let mut at = 0usize;
        let mut spans = Vec::with_capacity(block.tensors.len());
        for &ti in &block.tensors {
            let t = &self.tensors[ti];
            let n = t.held_bytes(dtype);
            convert_par(&self.file_bytes(t), t.file_dtype, t.held_dtype(dtype), &mut buf[at..at + n], true);
            spans.push((ti, at, n));
            at += n;
        }
        for (ti, at, n) in spans {
            let t = &self.tensors[ti];
            out.insert(
                t.rel_name.clone(),
                alloc.tensor_from_bytes(&buf[at..at + n], t.held_dtype(dtype), &t.held_shape())?,
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
