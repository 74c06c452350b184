//! The checkpoint a UNet configuration expects: every tensor's diffusers name and shape, in execution order. Used to
//! size the streaming units of a model without its weights (the real SDXL in tests and benchmarks) and checked
//! against the tiny fixtures' files.

use crate::models::blocks::{ResnetSpec, TransformerSpec};

use super::UNet2DConditionModel;

type Shapes = Vec<(String, Vec<usize>)>;

fn push(out: &mut Shapes, key: &str, name: &str, shape: &[usize]) {
    out.push((format!("{key}.{name}"), shape.to_vec()));
}

fn resnet(out: &mut Shapes, r: &ResnetSpec) {
    let (k, i, o) = (&r.key, r.cin, r.cout);
    push(out, k, "norm1.weight", &[i]);
    push(out, k, "norm1.bias", &[i]);
    push(out, k, "conv1.weight", &[o, i, 3, 3]);
    push(out, k, "conv1.bias", &[o]);
    if let Some(t) = r.temb {
        push(out, k, "time_emb_proj.weight", &[o, t]);
        push(out, k, "time_emb_proj.bias", &[o]);
    }
    push(out, k, "norm2.weight", &[o]);
    push(out, k, "norm2.bias", &[o]);
    push(out, k, "conv2.weight", &[o, o, 3, 3]);
    push(out, k, "conv2.bias", &[o]);
    if i != o {
        push(out, k, "conv_shortcut.weight", &[o, i, 1, 1]);
        push(out, k, "conv_shortcut.bias", &[o]);
    }
}

fn transformer(out: &mut Shapes, t: &TransformerSpec) {
    let (k, c, x) = (&t.key, t.channels, t.cross_dim);
    let proj: &[usize] = if t.linear_proj { &[c, c] } else { &[c, c, 1, 1] };
    push(out, k, "norm.weight", &[c]);
    push(out, k, "norm.bias", &[c]);
    push(out, k, "proj_in.weight", proj);
    push(out, k, "proj_in.bias", &[c]);
    for l in 0..t.depth {
        let b = format!("{k}.transformer_blocks.{l}");
        for n in ["norm1", "norm2", "norm3"] {
            push(out, &b, &format!("{n}.weight"), &[c]);
            push(out, &b, &format!("{n}.bias"), &[c]);
        }
        for (a, kv) in [("attn1", c), ("attn2", x)] {
            push(out, &b, &format!("{a}.to_q.weight"), &[c, c]);
            push(out, &b, &format!("{a}.to_k.weight"), &[c, kv]);
            push(out, &b, &format!("{a}.to_v.weight"), &[c, kv]);
            push(out, &b, &format!("{a}.to_out.0.weight"), &[c, c]);
            push(out, &b, &format!("{a}.to_out.0.bias"), &[c]);
        }
        push(out, &b, "ff.net.0.proj.weight", &[8 * c, c]);
        push(out, &b, "ff.net.0.proj.bias", &[8 * c]);
        push(out, &b, "ff.net.2.weight", &[c, 4 * c]);
        push(out, &b, "ff.net.2.bias", &[c]);
    }
    push(out, k, "proj_out.weight", proj);
    push(out, k, "proj_out.bias", &[c]);
}

impl UNet2DConditionModel {
    /// Every tensor a checkpoint for this configuration holds (diffusers names, no optional attention biases), in
    /// the order the forward uses them.
    pub fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let c = &self.config;
        let (c0, t) = (c.block_out_channels[0], self.temb_dim);
        let mut out = Shapes::new();
        push(&mut out, "time_embedding", "linear_1.weight", &[t, c0]);
        push(&mut out, "time_embedding", "linear_1.bias", &[t]);
        push(&mut out, "time_embedding", "linear_2.weight", &[t, t]);
        push(&mut out, "time_embedding", "linear_2.bias", &[t]);
        if let Some(tt) = c.text_time {
            push(
                &mut out,
                "add_embedding",
                "linear_1.weight",
                &[t, tt.projection_input_dim],
            );
            push(&mut out, "add_embedding", "linear_1.bias", &[t]);
            push(&mut out, "add_embedding", "linear_2.weight", &[t, t]);
            push(&mut out, "add_embedding", "linear_2.bias", &[t]);
        }
        let conv = |out: &mut Shapes, key: &str, o: usize, i: usize| {
            push(out, key, "weight", &[o, i, 3, 3]);
            push(out, key, "bias", &[o]);
        };
        conv(&mut out, "conv_in", c0, c.in_channels);
        for blk in &self.down {
            for (j, r) in blk.resnets.iter().enumerate() {
                resnet(&mut out, r);
                if let Some(a) = blk.attentions.get(j) {
                    transformer(&mut out, a);
                }
            }
            if let Some(d) = &blk.downsample {
                conv(&mut out, &format!("{}.conv", d.key), d.c, d.c);
            }
        }
        resnet(&mut out, &self.mid_resnets[0]);
        transformer(&mut out, &self.mid_attention);
        resnet(&mut out, &self.mid_resnets[1]);
        for blk in &self.up {
            for (j, r) in blk.resnets.iter().enumerate() {
                resnet(&mut out, r);
                if let Some(a) = blk.attentions.get(j) {
                    transformer(&mut out, a);
                }
            }
            if let Some(u) = &blk.upsample {
                conv(&mut out, &format!("{}.conv", u.key), u.c, u.c);
            }
        }
        push(&mut out, "conv_norm_out", "weight", &[c0]);
        push(&mut out, "conv_norm_out", "bias", &[c0]);
        conv(&mut out, "conv_out", c.out_channels, c0);
        out
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use crate::models::unet::{block_of, UNet2DConditionModel, UNetConfig};

    /// The SDXL base UNet: 2,567,463,684 parameters (diffusers' count); split by [`block_of`] into units of at most
    /// 94 MiB fp16 (the 2560→1280 resnet `up_blocks.0.resnets.0`; a 1280-channel transformer layer is 66 MiB),
    /// against 669 MiB for a whole 10-layer attention stack. (`up_blocks.0.resnets.1` has the same size.)
    #[test]
    fn sdxl_base_units_stay_small() {
        let m =
            UNet2DConditionModel::new(UNetConfig::from_json(super::super::config::tests::SDXL_BASE).unwrap()).unwrap();
        let shapes = m.tensor_shapes();
        let params: usize = shapes.iter().map(|(_, s)| s.iter().product::<usize>()).sum();
        assert_eq!(params, 2_567_463_684);
        let mut units: BTreeMap<&str, usize> = BTreeMap::new();
        let mut stacks: BTreeMap<&str, usize> = BTreeMap::new();
        for (name, s) in &shapes {
            let n: usize = s.iter().product();
            *units.entry(block_of(name)).or_default() += n;
            if let Some(i) = name.find(".attentions.") {
                let end = i + ".attentions.".len() + 1;
                *stacks.entry(&name[..end]).or_default() += n;
            }
        }
        let mib = |n: usize| (n * 2) as f64 / (1u64 << 20) as f64;
        let (largest, n) = units.iter().max_by_key(|(_, n)| **n).map(|(k, n)| (*k, *n)).unwrap();
        let stack = *stacks.values().max().unwrap();
        let layer = units["down_blocks.2.attentions.0.transformer_blocks.0"];
        println!(
            "SDXL base: {} units, largest {largest} {:.1} MiB fp16; transformer layer {:.1} MiB; whole stack {:.1} MiB",
            units.len(),
            mib(n),
            mib(layer),
            mib(stack)
        );
        assert!(
            largest == "up_blocks.0.resnets.0" || largest == "up_blocks.0.resnets.1",
            "{largest}"
        );
        assert!(mib(n) < 94.0 && mib(layer) < 67.0 && mib(stack) > 669.0);
        assert_eq!(units.len(), 118);
    }
}
