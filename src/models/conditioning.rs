//! Conditioning: the named tensors a denoiser needs besides the latents, as they cross the API.
//!
//! The names are those of the CLI's `--inputs` file and the C API (`sampling.cond_embeddings`,
//! `sampling.cond_pooled`, `sampling.time_ids`, ...). A family states which names it needs and their shapes
//! ([`CondSpec`]); [`Conditioning::check`] rejects missing or misshapen tensors with the name and the expected shape,
//! so every family reports input errors the same way.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// Text embeddings of the prompt `[B, S, D]`.
pub const COND_EMBEDDINGS: &str = "sampling.cond_embeddings";
/// Text embeddings of the negative prompt `[B, S, D]` (zeros when absent).
pub const UNCOND_EMBEDDINGS: &str = "sampling.uncond_embeddings";
/// Pooled text embedding of the prompt `[B, P]` (SDXL: bigG's projected pooled output).
pub const COND_POOLED: &str = "sampling.cond_pooled";
/// Pooled text embedding of the negative prompt `[B, P]` (zeros when absent).
pub const UNCOND_POOLED: &str = "sampling.uncond_pooled";
/// Distilled guidance scale per row `[B]` (FLUX.1 dev: the pipeline's `--guidance`, e.g. 3.5), an input of the model
/// rather than classifier-free guidance.
pub const GUIDANCE: &str = "sampling.guidance";
/// SDXL micro-conditioning `[B, 6]`: original (h, w), crop (top, left), target (h, w), in image pixels.
pub const TIME_IDS: &str = "sampling.time_ids";

/// One dimension of an expected shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dim {
    /// The batch (the same for every tensor of one conditioning).
    Batch,
    /// Any size (a sequence length).
    Any,
    /// Exactly this size.
    Is(usize),
}

/// A conditioning tensor a family needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CondSpec {
    pub name: &'static str,
    pub dims: Vec<Dim>,
    /// Missing optional tensors are zeros of the shape of their pair (`uncond_*` of `cond_*`).
    pub required: bool,
}

impl CondSpec {
    pub fn required(name: &'static str, dims: Vec<Dim>) -> Self {
        Self { name, dims, required: true }
    }

    pub fn optional(name: &'static str, dims: Vec<Dim>) -> Self {
        Self { name, dims, required: false }
    }

    /// The shape as text, e.g. `[B, S, 768]`.
    pub fn shape_text(&self) -> String {
        let parts: Vec<String> = self
            .dims
            .iter()
            .map(|d| match d {
                Dim::Batch => "B".to_string(),
                Dim::Any => "S".to_string(),
                Dim::Is(n) => n.to_string(),
            })
            .collect();
        format!("[{}]", parts.join(", "))
    }
}

/// Named conditioning tensors (f32 or the host's dtype, on the CPU until a run moves them).
#[derive(Debug, Clone, Default)]
pub struct Conditioning {
    tensors: BTreeMap<String, Tensor>,
}

impl Conditioning {
    pub fn new() -> Self {
        Self::default()
    }

    /// Set `name` (replacing a previous tensor of that name).
    pub fn insert(&mut self, name: impl Into<String>, tensor: Tensor) {
        self.tensors.insert(name.into(), tensor);
    }

    /// The tensor `name`, if set.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.get(name)
    }

    /// Remove `name`; returns whether it was set.
    pub fn remove(&mut self, name: &str) -> bool {
        self.tensors.remove(name).is_some()
    }

    /// Names and tensors, in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.tensors.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Check every tensor of `specs` (and reject names no spec knows, so a typo is not silently ignored); returns
    /// the batch size.
    pub fn check(&self, specs: &[CondSpec], family: &str) -> Result<usize> {
        for name in self.tensors.keys() {
            if !specs.iter().any(|s| s.name == name) {
                let known: Vec<&str> = specs.iter().map(|s| s.name).collect();
                return Err(Error::invalid(format!(
                    "{family} does not use conditioning tensor {name} (it takes {})",
                    known.join(", ")
                )));
            }
        }
        let mut batch: Option<(usize, &str)> = None;
        for spec in specs {
            let Some(t) = self.tensors.get(spec.name) else {
                if spec.required {
                    return Err(Error::invalid(format!(
                        "{family} needs conditioning tensor {} {}",
                        spec.name,
                        spec.shape_text()
                    )));
                }
                continue;
            };
            let d = t.dims();
            let fits = d.len() == spec.dims.len()
                && d.iter().zip(&spec.dims).all(|(&n, want)| match want {
                    Dim::Batch | Dim::Any => n > 0,
                    Dim::Is(m) => n == *m,
                });
            if !fits {
                return Err(Error::invalid(format!(
                    "{} has shape {d:?}, {family} expects {}",
                    spec.name,
                    spec.shape_text()
                )));
            }
            if let Some(i) = spec.dims.iter().position(|x| *x == Dim::Batch) {
                match batch {
                    Some((b, other)) if b != d[i] => {
                        return Err(Error::invalid(format!(
                            "{} has batch {}, {other} has batch {b}",
                            spec.name, d[i]
                        )))
                    }
                    None => batch = Some((d[i], spec.name)),
                    _ => {}
                }
            }
        }
        // A negative pair must match its positive's shape exactly (same sequence length).
        for (neg, pos) in [(UNCOND_EMBEDDINGS, COND_EMBEDDINGS), (UNCOND_POOLED, COND_POOLED)] {
            if let (Some(n), Some(p)) = (self.tensors.get(neg), self.tensors.get(pos)) {
                if n.dims() != p.dims() {
                    return Err(Error::invalid(format!(
                        "{neg} has shape {:?}, {pos} has {:?}",
                        n.dims(),
                        p.dims()
                    )));
                }
            }
        }
        batch.map(|(b, _)| b).ok_or_else(|| Error::invalid(format!("{family}: no conditioning tensor gives a batch")))
    }

    /// The conditioning as the model sees one batch of the sampler on `device` in `dtype`: with `cfg`, each
    /// `cond_*` tensor is stacked after its `uncond_*` pair (zeros when the pair is absent) and other tensors are
    /// repeated (`[uncond; cond]`, the order diffusers uses); without, the `cond_*` tensors alone. Keys lose their
    /// `sampling.` and `cond_` prefixes: `embeddings`, `pooled`, `time_ids`.
    pub fn batched(&self, cfg: bool, device: &Device, dtype: DType) -> Result<BatchedConditioning> {
        let mut out = BTreeMap::new();
        for (name, t) in &self.tensors {
            if name.starts_with("sampling.uncond_") {
                continue;
            }
            let key = name.trim_start_matches("sampling.").trim_start_matches("cond_").to_string();
            let t = t.to_device(device)?.to_dtype(dtype)?;
            let t = if !cfg {
                t
            } else if let Some(pos) = name.strip_prefix("sampling.cond_") {
                let neg = match self.tensors.get(&format!("sampling.uncond_{pos}")) {
                    Some(n) => n.to_device(device)?.to_dtype(dtype)?,
                    None => t.zeros_like()?,
                };
                Tensor::cat(&[&neg, &t], 0)?
            } else {
                Tensor::cat(&[&t, &t], 0)?
            };
            out.insert(key, t);
        }
        Ok(BatchedConditioning { tensors: out })
    }
}

/// Conditioning for one model batch (see [`Conditioning::batched`]).
#[derive(Debug, Clone)]
pub struct BatchedConditioning {
    tensors: BTreeMap<String, Tensor>,
}

impl BatchedConditioning {
    /// The tensor `key` (`embeddings`, `pooled`, `time_ids`), or INVALID_ARGUMENT naming it.
    pub fn get(&self, key: &str) -> Result<&Tensor> {
        self.tensors.get(key).ok_or_else(|| Error::invalid(format!("missing conditioning tensor {key}")))
    }

    /// The tensor `key` if present.
    pub fn get_opt(&self, key: &str) -> Option<&Tensor> {
        self.tensors.get(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(shape: &[usize], v: f32) -> Tensor {
        Tensor::full(v, shape, &Device::Cpu).unwrap()
    }

    fn sdxl_specs() -> Vec<CondSpec> {
        vec![
            CondSpec::required(COND_EMBEDDINGS, vec![Dim::Batch, Dim::Any, Dim::Is(64)]),
            CondSpec::optional(UNCOND_EMBEDDINGS, vec![Dim::Batch, Dim::Any, Dim::Is(64)]),
            CondSpec::required(COND_POOLED, vec![Dim::Batch, Dim::Is(32)]),
            CondSpec::optional(UNCOND_POOLED, vec![Dim::Batch, Dim::Is(32)]),
            CondSpec::required(TIME_IDS, vec![Dim::Batch, Dim::Is(6)]),
        ]
    }

    #[test]
    fn check_names_the_tensor_and_its_shape() {
        let mut c = Conditioning::new();
        c.insert(COND_EMBEDDINGS, t(&[2, 77, 64], 1.0));
        let e = c.check(&sdxl_specs(), "SDXL").unwrap_err().to_string();
        assert!(e.contains("sampling.cond_pooled [B, 32]"), "{e}");
        c.insert(COND_POOLED, t(&[2, 31], 1.0));
        let e = c.check(&sdxl_specs(), "SDXL").unwrap_err().to_string();
        assert!(e.contains("sampling.cond_pooled has shape [2, 31]"), "{e}");
        c.insert(COND_POOLED, t(&[2, 32], 1.0));
        c.insert(TIME_IDS, t(&[1, 6], 1.0));
        let e = c.check(&sdxl_specs(), "SDXL").unwrap_err().to_string();
        assert!(e.contains("batch"), "{e}");
        c.insert(TIME_IDS, t(&[2, 6], 1.0));
        assert_eq!(c.check(&sdxl_specs(), "SDXL").unwrap(), 2);
        c.insert("sampling.cond_poooled", t(&[2, 32], 1.0));
        let e = c.check(&sdxl_specs(), "SDXL").unwrap_err().to_string();
        assert!(e.contains("sampling.cond_poooled"), "{e}");
    }

    #[test]
    fn batched_puts_the_negative_first_and_zeros_a_missing_one() {
        let mut c = Conditioning::new();
        c.insert(COND_EMBEDDINGS, t(&[1, 3, 64], 2.0));
        c.insert(UNCOND_EMBEDDINGS, t(&[1, 3, 64], -1.0));
        c.insert(COND_POOLED, t(&[1, 32], 5.0));
        c.insert(TIME_IDS, t(&[1, 6], 7.0));
        let b = c.batched(true, &Device::Cpu, DType::F32).unwrap();
        let e = b.get("embeddings").unwrap();
        assert_eq!(e.dims(), &[2, 3, 64]);
        assert_eq!(e.get(0).unwrap().max_keepdim(1).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()[0], -1.0);
        assert_eq!(e.get(1).unwrap().min_keepdim(1).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()[0], 2.0);
        let p = b.get("pooled").unwrap().to_vec2::<f32>().unwrap();
        assert_eq!((p[0][0], p[1][0]), (0.0, 5.0));
        let ids = b.get("time_ids").unwrap().to_vec2::<f32>().unwrap();
        assert_eq!((ids[0][0], ids[1][0]), (7.0, 7.0));
        let single = c.batched(false, &Device::Cpu, DType::F32).unwrap();
        assert_eq!(single.get("embeddings").unwrap().dims(), &[1, 3, 64]);
        assert!(single.get_opt("uncond_embeddings").is_none());
    }
}
