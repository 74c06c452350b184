//! Shared helpers for the memory tests: tiny chain models written as real safetensors files, and their forward.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{DType, Device, Tensor};
use lowvram::config::Config;
use lowvram::{Result, WeightSource};

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "lowvram-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A chain model: block i maps dims[i] → dims[i+1] with `weight` [dims[i], dims[i+1]] and `bias` [dims[i+1]].
#[derive(Clone)]
pub struct TestModel {
    pub path: PathBuf,
    pub dims: Vec<usize>,
    pub blocks: Vec<String>,
    /// Bytes per block (f32).
    pub block_bytes: Vec<u64>,
}

impl TestModel {
    pub fn total(&self) -> u64 {
        self.block_bytes.iter().sum()
    }
    pub fn max_block(&self) -> u64 {
        *self.block_bytes.iter().max().unwrap()
    }
}

fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0) * scale
        })
        .collect()
}

/// Write a chain model with the given dims (f32) to `dir/name.safetensors`.
pub fn write_model(dir: &Path, name: &str, dims: &[usize], seed: u64) -> TestModel {
    write_model_as(dir, name, dims, seed, DType::F32)
}

/// [`write_model`] with the tensors stored in `dtype` (`block_bytes` are then in that dtype).
pub fn write_model_as(dir: &Path, name: &str, dims: &[usize], seed: u64, dtype: DType) -> TestModel {
    let mut tensors = HashMap::new();
    let mut blocks = Vec::new();
    let mut block_bytes = Vec::new();
    for i in 0..dims.len() - 1 {
        let key = format!("down_blocks.0.resnets.{i}");
        let (a, b) = (dims[i], dims[i + 1]);
        let w = Tensor::from_vec(values(a * b, seed * 1000 + i as u64, 1.5 / (a as f32).sqrt()), (a, b), &Device::Cpu)
            .unwrap();
        let bias = Tensor::from_vec(values(b, seed * 7777 + i as u64, 0.1), b, &Device::Cpu).unwrap();
        tensors.insert(format!("{key}.weight"), w.to_dtype(dtype).unwrap());
        tensors.insert(format!("{key}.bias"), bias.to_dtype(dtype).unwrap());
        blocks.push(key);
        block_bytes.push(((a * b + b) * dtype.size_in_bytes()) as u64);
    }
    let path = dir.join(format!("{name}.safetensors"));
    candle_core::safetensors::save(&tensors, &path).unwrap();
    TestModel { path, dims: dims.to_vec(), blocks, block_bytes }
}

/// The forward: x = tanh(x·Wᵢ + bᵢ), fetching each block in order and dropping it before the next.
/// `hook(i, &weights)` runs while block i is held.
pub fn forward_with(src: &dyn WeightSource, m: &TestModel, mut hook: impl FnMut(usize)) -> Result<Vec<f32>> {
    let mut x = Tensor::from_vec(values(2 * m.dims[0], 42, 1.0), (2, m.dims[0]), src.device())?;
    for (i, key) in m.blocks.iter().enumerate() {
        let w = src.fetch(key)?;
        let weight = w.get_shaped("weight", &[m.dims[i], m.dims[i + 1]])?.to_dtype(DType::F32)?;
        let bias = w.get("bias")?.to_dtype(DType::F32)?;
        x = x.matmul(&weight)?.broadcast_add(&bias)?.tanh()?;
        hook(i);
        drop(w);
    }
    Ok(x.flatten_all()?.to_vec1::<f32>()?)
}

pub fn forward(src: &dyn WeightSource, m: &TestModel) -> Result<Vec<f32>> {
    forward_with(src, m, |_| {})
}

/// A config on `device` with `working` bytes of working memory.
pub fn config(device: &str, working: u64) -> Config {
    let mut c = Config::default();
    c.set("device", device).unwrap();
    c.set("device_working_mem_gb", &format!("{}", working as f64 / (1u64 << 30) as f64)).unwrap();
    c
}

pub fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}
