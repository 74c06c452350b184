//! Launch geometry of the CUDA kernels that depends on the shape: pure functions of the formulas in the kernels'
//! headers, compiled in every build so that the CPU test suite checks them and the working-memory estimates can use
//! them.

use candle_core::DType;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Geometry {
    pub rows: usize,
    pub threads: u32,
    pub smem: u32,
}

/// Launch geometry of one attention kernel (kernels/attention.cu): query rows per block, threads, dynamic shared memory.

/// The geometry of the kernel for head size `d` and `dtype`, or None when no kernel exists for it — the formulas of
/// kernels/attention.cu's header (the kernel traps if given less shared memory than they say).
pub(crate) fn attention(d: usize, dtype: DType) -> Option<Geometry> {
    if !matches!(d, 40 | 64 | 80 | 128 | 160 | 512) {
        return None;
    }
    let (rows, smem) = match dtype {
        DType::F16 | DType::BF16 if d == 512 => (
            16,
            2 * 16 * 520 + 2 * 32 * 520 + 4 * 2 * 16 * 36 + 2 * 16 * 40 + 4 * 16 + 32,
        ),
        DType::F16 | DType::BF16 => {
            let bk = if d == 160 { 48 } else { 64 };
            let sk = d.div_ceil(16) * 16 + 8;
            (
                64,
                4 * bk * sk + 4 * 64 * (bk + 4) + 2 * 64 * (bk + 8) + 4 * 64 + 32,
            )
        }
        DType::F32 => {
            let (bq, bk) = if d == 512 { (16, 8) } else { (32, 32) };
            (
                bq,
                4 * bq * (d + 1) + 4 * bk * (d + 1) + 4 * bq * (bk + 4) + 4 * bq + 32,
            )
        }
        _ => return None,
    };
    Some(Geometry {
        rows,
        threads: 128,
        smem: smem as u32,
    })
}

#[cfg(test)]
mod tests {
    use candle_core::DType;

    /// The table of kernels/attention.cu's header.
    #[test]
    fn geometry_matches_the_kernel_header() {
        let smem = |d, t| super::attention(d, t).unwrap().smem;
        let mma = [
            (40, 41248),
            (64, 45344),
            (80, 49440),
            (128, 61728),
            (160, 53024),
            (512, 55904),
        ];
        for (d, want) in mma {
            assert_eq!(
                (smem(d, DType::F16), smem(d, DType::BF16)),
                (want, want),
                "d{d}"
            );
        }
        for (d, want) in [
            (40, 15264),
            (64, 21408),
            (80, 25504),
            (128, 37792),
            (160, 45984),
            (512, 50112),
        ] {
            assert_eq!(smem(d, DType::F32), want, "d{d}");
        }
        assert_eq!(super::attention(512, DType::F16).unwrap().rows, 16);
        assert_eq!(super::attention(40, DType::F32).unwrap().rows, 32);
        assert!(
            super::attention(96, DType::F16).is_none()
                && super::attention(64, DType::F64).is_none()
        );
    }
}
