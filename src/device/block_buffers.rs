//! Reusable device buffers for streamed blocks on the emulated device.
//!
//! A streamed block is written into one flat buffer and its tensors are views into it (one allocation and one
//! contiguous copy per block, as on a GPU, where big copies are what reach full bandwidth). When the block's lease
//! drops, the buffer goes back to a small free list instead of to the allocator, so the next block reuses memory
//! whose pages are already mapped: without it, every streamed byte also paid a page fault and a zeroing pass.
//! Byte accounting is unchanged — the cache's leases count a streamed block's bytes while it is in use; buffers on
//! the free list are the emulated device's own cache, like a CUDA pool's kept blocks.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, DType, Device, Layout, Shape, Tensor};

use crate::error::Result;

/// Free buffers kept at most (one in use, one being filled, one spare).
const KEEP_FREE: usize = 3;

/// The pool: free flat buffers by dtype and capacity (elements).
#[derive(Default)]
pub struct BlockBuffers {
    free: Mutex<Vec<Tensor>>,
}

/// One flat buffer taken from the pool; it goes back when dropped. Views made by [`BlockBuffer::view`] share its
/// memory: they must not outlive it (the cache drops a streamed block's tensors with its lease).
pub struct BlockBuffer {
    flat: Option<Tensor>,
    pool: Arc<BlockBuffers>,
}

impl BlockBuffers {
    /// An empty pool.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// A buffer of `dtype` holding at least `elems` elements: the smallest free one that fits, else a new one.
    pub fn take(self: &Arc<Self>, dtype: DType, elems: usize) -> Result<BlockBuffer> {
        let found = {
            let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
            let best = free
                .iter()
                .enumerate()
                .filter(|(_, t)| t.dtype() == dtype && t.elem_count() >= elems)
                .min_by_key(|(_, t)| t.elem_count())
                .map(|(i, _)| i);
            best.map(|i| free.swap_remove(i))
        };
        let flat = match found {
            Some(t) => t,
            // zeros() is calloc'd: its pages are mapped when first written, by the copy itself.
            None => Tensor::zeros(elems, dtype, &Device::Cpu)?,
        };
        Ok(BlockBuffer {
            flat: Some(flat),
            pool: self.clone(),
        })
    }

    /// Host bytes held by free buffers.
    pub fn free_bytes(&self) -> u64 {
        let free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        free.iter()
            .map(|t| (t.elem_count() * t.dtype().size_in_bytes()) as u64)
            .sum()
    }

    fn give_back(&self, t: Tensor) {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        free.push(t);
        if free.len() > KEEP_FREE {
            // Drop the smallest: the pool converges on buffers that fit the largest blocks.
            let (i, _) = free
                .iter()
                .enumerate()
                .min_by_key(|(_, t)| t.elem_count())
                .expect("not empty");
            free.swap_remove(i);
        }
    }
}

impl Drop for BlockBuffer {
    fn drop(&mut self) {
        if let Some(t) = self.flat.take() {
            self.pool.give_back(t);
        }
    }
}

/// Writes bytes into a CPU storage at a byte offset (candle hands in-place ops the storage mutably).
struct WriteBytes<F: Fn(&mut [u8]) + Sync> {
    byte_offset: usize,
    len: usize,
    fill: F,
}

impl<F: Fn(&mut [u8]) + Sync> candle_core::InplaceOp1 for WriteBytes<F> {
    fn name(&self) -> &'static str {
        "lowvram-write-bytes"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, _layout: &Layout) -> candle_core::Result<()> {
        fn bytes_of<T>(v: &mut [T]) -> &mut [u8] {
            // SAFETY: the element types below are plain numbers, any byte pattern is a valid value.
            unsafe {
                std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut u8, std::mem::size_of_val(v))
            }
        }
        let all = match storage {
            CpuStorage::F32(v) => bytes_of(v),
            CpuStorage::F16(v) => bytes_of(v),
            CpuStorage::BF16(v) => bytes_of(v),
            _ => candle_core::bail!("block buffers hold f32, f16 or bf16"),
        };
        let end = self.byte_offset + self.len;
        if end > all.len() {
            candle_core::bail!(
                "write of {} bytes at {} past a {}-byte buffer",
                self.len,
                self.byte_offset,
                all.len()
            );
        }
        (self.fill)(&mut all[self.byte_offset..end]);
        Ok(())
    }
}

impl BlockBuffer {
    fn flat(&self) -> &Tensor {
        self.flat.as_ref().expect("present until drop")
    }

    /// Fill `len` bytes at element offset `elem_offset` by calling `fill` on them (once).
    pub fn write(
        &self,
        elem_offset: usize,
        len: usize,
        fill: impl Fn(&mut [u8]) + Sync,
    ) -> Result<()> {
        let flat = self.flat();
        let op = WriteBytes {
            byte_offset: elem_offset * flat.dtype().size_in_bytes(),
            len,
            fill,
        };
        flat.inplace_op1(&op)?;
        Ok(())
    }

    /// A tensor of `shape` viewing the buffer from element `elem_offset` (no copy).
    pub fn view(&self, elem_offset: usize, shape: &[usize]) -> Result<Tensor> {
        let n = Shape::from(shape).elem_count();
        Ok(self.flat().narrow(0, elem_offset, n)?.reshape(shape)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused_and_views_see_the_written_bytes() {
        let pool = BlockBuffers::new();
        let a = pool.take(DType::F32, 6).unwrap();
        let vals: Vec<f32> = vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let src: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        a.write(2, 16, |d| d.copy_from_slice(&src[8..24])).unwrap();
        let v = a.view(2, &[2, 2]).unwrap();
        assert_eq!(
            v.to_vec2::<f32>().unwrap(),
            vec![vec![3.0, 4.0], vec![5.0, 6.0]]
        );
        assert!(
            a.write(5, 8, |_| {}).is_err(),
            "a write past the end is refused"
        );
        drop(v);
        drop(a);
        assert_eq!(pool.free_bytes(), 24);
        // A smaller request reuses the same buffer; a different dtype does not.
        let b = pool.take(DType::F32, 4).unwrap();
        assert_eq!(pool.free_bytes(), 0);
        let c = pool.take(DType::F16, 4).unwrap();
        drop((b, c));
        assert_eq!(pool.free_bytes(), 24 + 8);
        for n in 1..=5 {
            drop(pool.take(DType::BF16, 100 + n).unwrap());
            let _held: Vec<BlockBuffer> =
                (0..4).map(|_| pool.take(DType::BF16, 1).unwrap()).collect();
        }
        assert!(pool.free.lock().unwrap().len() <= KEEP_FREE);
    }
}
