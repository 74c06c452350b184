//! Tiled tensor ops for the VAE decoder: every full activation lives in host memory (a CPU tensor) and the device
//! only ever holds one tile's input (with its halo) and output, so device working memory is bounded by the tile
//! size, not the image size.
//!
//! The ops are exact, not blended: a 3×3 conv reads its tile plus a 1-pixel halo (zero padding only at the true
//! image border), and GroupNorm uses statistics gathered over the whole activation in a first pass over the tiles.
//! Tiled results therefore equal the untiled ones up to summation-order rounding.

use std::ops::Range;

use candle_core::{DType, Device, Tensor};

use crate::ops::OpTarget;
use crate::error::{Error, Result};
use crate::ops::{conv2d, conv2d_scratch_bytes};

/// An output tile: rows `y` and columns `x` of an activation at one resolution (all channels, all batch items).
#[derive(Debug, Clone)]
pub(crate) struct Rect {
    pub y: Range<usize>,
    pub x: Range<usize>,
}

impl Rect {
    fn h(&self) -> usize {
        self.y.len()
    }
    fn w(&self) -> usize {
        self.x.len()
    }
}

/// The tiles covering an `h`×`w` activation with tiles of at most `tile`×`tile` pixels, row by row.
pub(crate) fn tiles(h: usize, w: usize, tile: usize) -> Vec<Vec<Rect>> {
    let spans = |n: usize| (0..n).step_by(tile.max(1)).map(move |s| s..(s + tile).min(n));
    spans(h).map(|y| spans(w).map(|x| Rect { y: y.clone(), x }).collect()).collect()
}

/// Compute an activation `[b, c, h, w]` tile by tile: `f` returns the tile `r` (on any device) and it is copied to
/// the host at once, so only one output tile is ever on the device. The tiles are stitched with one concatenation
/// per row and one for the rows (candle has no cheap in-place write of a 2-D window).
pub(crate) fn map_tiles(
    (b, c, h, w): (usize, usize, usize, usize),
    tile: usize,
    mut f: impl FnMut(&Rect) -> Result<Tensor>,
) -> Result<Tensor> {
    let mut rows = Vec::new();
    for row in tiles(h, w, tile) {
        let mut parts = Vec::with_capacity(row.len());
        for r in &row {
            // Per tile: a cancel need not wait for the whole layer (on CUDA the ops do not poll it themselves).
            crate::ops::cancel::check()?;
            let t = f(r)?;
            if t.dims() != [b, c, r.h(), r.w()] {
                return Err(Error::invalid(format!("tiled op: tile {r:?} came out {:?}", t.dims())));
            }
            parts.push(t.to_device(&Device::Cpu)?);
        }
        rows.push(Tensor::cat(&parts, 3)?);
    }
    Ok(Tensor::cat(&rows, 2)?)
}

/// Copy the window `r` of the host activation `x` to `dev`.
pub(crate) fn load(x: &Tensor, r: &Rect, dev: &Device) -> Result<Tensor> {
    Ok(x.narrow(2, r.y.start, r.h())?.narrow(3, r.x.start, r.w())?.contiguous()?.to_device(dev)?)
}

/// Per-(batch, group) mean and inverse standard deviation of a host activation, gathered tile by tile.
///
/// Each tile contributes its count, mean and centred sum of squares (computed on the device in f32, like
/// [`crate::ops::group_norm`]); tiles are merged in f64 with Chan et al.'s pairwise update, which, unlike
/// Σx² − (Σx)²/n, does not lose precision when the mean is large next to the spread.
pub(crate) struct GroupStats {
    groups: usize,
    /// `[b·groups]` each.
    mean: Vec<f64>,
    var: Vec<f64>,
}

impl GroupStats {
    pub fn gather(x: &Tensor, groups: usize, tile: usize, dev: &Device) -> Result<Self> {
        let (b, c, h, w) = x.dims4()?;
        if groups == 0 || c % groups != 0 {
            return Err(Error::invalid(format!("group_norm: {c} channels not divisible into {groups} groups")));
        }
        let bg = b * groups;
        let (mut n, mut mean, mut m2) = (0f64, vec![0f64; bg], vec![0f64; bg]);
        for r in tiles(h, w, tile).into_iter().flatten() {
            crate::ops::cancel::check()?;
            let t = load(x, &r, dev)?.to_dtype(DType::F32)?.reshape((b, groups, ()))?;
            let nt = t.dim(2)? as f64;
            let mt = t.mean_keepdim(2)?;
            let m2t = t.broadcast_sub(&mt)?.sqr()?.sum_keepdim(2)?;
            drop(t);
            let mt: Vec<f32> = mt.flatten_all()?.to_vec1()?;
            let m2t: Vec<f32> = m2t.flatten_all()?.to_vec1()?;
            let total = n + nt;
            for i in 0..bg {
                let delta = mt[i] as f64 - mean[i];
                mean[i] += delta * nt / total;
                m2[i] += m2t[i] as f64 + delta * delta * n * nt / total;
            }
            n = total;
        }
        let var = m2.iter().map(|v| v / n).collect();
        Ok(Self { groups, mean, var })
    }
}

/// GroupNorm (+ SiLU) with given statistics, applied tile by tile on the device: `((x − mean)·inv_std)·weight +
/// bias`, in f32, the same sequence of operations as [`crate::ops::group_norm`] so the results agree to rounding.
pub(crate) struct TileNorm {
    /// `[b, c, 1, 1]` f32: each group's statistics repeated over its channels.
    mean: Tensor,
    inv_std: Tensor,
    /// `[1, c, 1, 1]` f32.
    weight: Tensor,
    bias: Tensor,
    silu: bool,
}

impl TileNorm {
    /// `weight`/`bias` `[c]` may be a fetched block's tensors only while that block is held; pass copies to outlive
    /// it (see [`Self::detached`]).
    pub fn new(stats: &GroupStats, weight: &Tensor, bias: &Tensor, eps: f64, silu: bool, dev: &Device) -> Result<Self> {
        let c = weight.dim(0)?;
        let b = stats.mean.len() / stats.groups;
        let per_channel = |v: &[f64], f: &dyn Fn(f64) -> f64| -> Result<Tensor> {
            let cg = c / stats.groups;
            let out: Vec<f32> = (0..b * c).map(|i| f(v[(i / c) * stats.groups + (i % c) / cg]) as f32).collect();
            Ok(Tensor::from_vec(out, (b, c, 1, 1), dev)?)
        };
        Ok(Self {
            mean: per_channel(&stats.mean, &|m| m)?,
            // f32 like the untiled path: (var + eps).sqrt().recip() on the f32 variance.
            inv_std: per_channel(&stats.var, &|v| 1.0 / ((v as f32 + eps as f32).sqrt() as f64))?,
            weight: weight.to_dtype(DType::F32)?.reshape((1, c, 1, 1))?,
            bias: bias.to_dtype(DType::F32)?.reshape((1, c, 1, 1))?,
            silu,
        })
    }

    /// Like [`Self::new`] with fresh copies of `weight` and `bias`, so the norm may outlive the block they came from
    /// (a block's tensors must not be used after its `BlockWeights` is dropped).
    pub fn detached(stats: &GroupStats, weight: &Tensor, bias: &Tensor, eps: f64, silu: bool, dev: &Device) -> Result<Self> {
        let mut n = Self::new(stats, weight, bias, eps, silu, dev)?;
        n.weight = n.weight.copy()?;
        n.bias = n.bias.copy()?;
        Ok(n)
    }

    /// Normalise a tile (any window: the statistics are global). Returns `x`'s dtype.
    pub fn apply(&self, x: Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let xf = x.to_dtype(DType::F32)?;
        drop(x);
        let n = xf.broadcast_sub(&self.mean)?.broadcast_mul(&self.inv_std)?;
        drop(xf);
        let mut y = n.broadcast_mul(&self.weight)?.broadcast_add(&self.bias)?;
        if self.silu {
            y = crate::ops::silu(&y)?;
        }
        Ok(y.to_dtype(dtype)?)
    }
}

/// A 3×3, stride-1, padding-1 conv of the host activation `x` (`[b, cin, h, w]`), optionally after an elementwise
/// `pre` op (a [`TileNorm`]) and a nearest `up`× upsample (1 or 2), computing only the output tile `r` (in output
/// coordinates, output size `up·h`×`up·w`).
///
/// Reads the input window that covers `r` plus a 1-pixel output halo, applies `pre`, upsamples, crops to exactly
/// the halo'd rows/columns and zero-pads the halo only where it falls outside the image, then convolves without
/// padding. `pre` runs before the zero padding, as in the untiled graph (norm → pad → conv).
pub(crate) fn conv3x3_tile(
    x: &Tensor,
    r: &Rect,
    up: usize,
    pre: Option<&TileNorm>,
    weight: &Tensor,
    bias: &Tensor,
    dev: &Device,
) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let (oh, ow) = (up * h, up * w);
    // Halo'd output span, clipped to the image; the source span that covers it; the zero padding left over.
    let span = |o: &Range<usize>, n: usize| {
        let lo = o.start.saturating_sub(1);
        let hi = (o.end + 1).min(n);
        (lo..hi, lo / up..hi.div_ceil(up), usize::from(o.start == 0), usize::from(o.end == n))
    };
    let (ys, sy, pad_top, pad_bottom) = span(&r.y, oh);
    let (xs, sx, pad_left, pad_right) = span(&r.x, ow);
    let mut t = load(x, &Rect { y: sy.clone(), x: sx.clone() }, dev)?;
    if let Some(n) = pre {
        t = n.apply(t)?;
    }
    if up != 1 {
        t = crate::ops::upsample_nearest2d(&t, up * sy.len(), up * sx.len())?;
        t = t.narrow(2, ys.start - up * sy.start, ys.len())?.narrow(3, xs.start - up * sx.start, xs.len())?;
    }
    t = t.pad_with_zeros(2, pad_top, pad_bottom)?.pad_with_zeros(3, pad_left, pad_right)?;
    conv2d(&t, weight, Some(bias), 1, 0)
}

/// Peak device bytes of one [`conv3x3_tile`] producing a `th`×`tw` tile, the largest of its stages: the loaded
/// window with the norm's f32 temporaries (at most three f32 copies live); the upsampled window; the two
/// zero-padding copies while their source lives; the padded input with the conv's scratch and its output.
pub(crate) fn conv3x3_tile_bytes(b: usize, cin: usize, cout: usize, th: usize, tw: usize, up: usize, norm: bool, e: OpTarget) -> u64 {
    let es = e.size_in_bytes() as u64;
    let bc = (b * cin) as u64;
    // Source pixels covering the halo'd tile: `up` − 1 more per side when the tile edge splits a source pixel.
    let src = ((th + 2).div_ceil(up) + up - 1) as u64 * ((tw + 2).div_ceil(up) + up - 1) as u64;
    let window = bc * src * es;
    let halo = bc * ((th + 2) * (tw + 2)) as u64 * es;
    let normed = if norm { window + 3 * 4 * bc * src } else { 0 };
    let upsampled = window * (up * up) as u64;
    let padding = upsampled + 2 * halo;
    let conv = halo + conv2d_scratch_bytes(b, cin, cout, th, tw, 3, 1, 0, e) + (b * cout * th * tw) as u64 * es;
    normed.max(padding).max(conv)
}

/// Peak device bytes of one tile of [`GroupStats::gather`]: the window, its f32 copy, the centred and squared values.
pub(crate) fn stats_tile_bytes(b: usize, c: usize, th: usize, tw: usize, e: OpTarget) -> u64 {
    let n = (b * c * th * tw) as u64;
    n * e.size_in_bytes() as u64 + 3 * 4 * n
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;

    #[test]
    fn tiles_cover_without_overlap() {
        let t = tiles(10, 7, 4);
        assert_eq!(t.len(), 3);
        assert_eq!(t[2][1].y, 8..10);
        assert_eq!(t[2][1].x, 4..7);
        assert_eq!(tiles(3, 3, 8)[0][0].x, 0..3);
    }

    #[test]
    fn tiled_conv_and_norm_equal_whole() {
        let dev = Device::Cpu;
        let x = (Tensor::randn(0f32, 1.0, (2, 4, 7, 9), &dev).unwrap() + 3.0).unwrap();
        let wt = Tensor::randn(0f32, 0.3, (5, 4, 3, 3), &dev).unwrap();
        let bias = Tensor::randn(0f32, 0.3, 5, &dev).unwrap();
        let gw = Tensor::randn(1f32, 0.1, 4, &dev).unwrap();
        let gb = Tensor::randn(0f32, 0.1, 4, &dev).unwrap();
        let stats = GroupStats::gather(&x, 2, 3, &dev).unwrap();
        let norm = TileNorm::new(&stats, &gw, &gb, 1e-6, true, &dev).unwrap();
        for up in [1, 2] {
            let whole = crate::ops::group_norm(&x, 2, &gw, &gb, 1e-6, true).unwrap();
            let whole = whole.upsample_nearest2d(7 * up, 9 * up).unwrap();
            let whole = conv2d(&whole, &wt, Some(&bias), 1, 1).unwrap();
            let tiled =
                map_tiles((2, 5, 7 * up, 9 * up), 4, |r| conv3x3_tile(&x, r, up, Some(&norm), &wt, &bias, &dev)).unwrap();
            let d = (tiled - whole).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(d < 1e-5, "up {up}: max diff {d}");
        }
    }
}
