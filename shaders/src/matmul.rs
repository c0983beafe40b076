//! Kernels that read quantised weights: matrix products for a few rows (`mm_rows`) and for
//! many (`mm_tile`, workgroup-shared tiles), the experts of a MoE layer (`mm_id`),
//! embedding rows.
//!
//! The `q_*` kernels are weight-format preludes: each binds one format's arrays at
//! bindings 4.. and defines `fn load8(p: u32) -> mat2x4<f32>`, the 8 consecutive values
//! of piece `p`. The `mm_*` kernels and `embed` are written against that function alone,
//! so they compile only with a prelude in front ([`crate::Kernel::assemble`]).
//!
//! `mm_dot` is the integer-dot path for Q8_0 weights (x quantised per block of 32 by
//! `quantize_x`, products summed with `dot4I8Packed`): it binds the weights through the
//! Q8_0 prelude and never calls `load8`.
//!
//! `mm_coop` multiplies through cooperative matrices (f16 products summed in f32) where an
//! adapter offers them; a cooperative-matrix prelude (`coop_8`, `coop_16`) goes in front
//! of its format and x preludes, with the `enable` directives WGSL wants first.
//!
//! `mm_rows` and `mm_tile` also take their input rows `x` from an x prelude
//! (`x_storage`, or `x_uniform` where a uniform buffer reads faster and x fits in one).

use crate::Kernel;

crate::registry::kernels! { MATMUL:
    Q_F32 => "q_f32",
    Q_F16 => "q_f16",
    Q_BF16 => "q_bf16",
    Q_Q8_0 => "q_q8_0",
    Q_Q4_0 => "q_q4_0",
    Q_Q4_1 => "q_q4_1",
    Q_Q4_K => "q_q4_k",
    Q_Q6_K => "q_q6_k",
    X_STORAGE => "x_storage",
    X_UNIFORM => "x_uniform",
    COOP_8 => "coop_8",
    COOP_16 => "coop_16",
    MM_ROWS => "mm_rows",
    MM_TILE => "mm_tile",
    MM_DOT => "mm_dot",
    MM_COOP => "mm_coop",
    QUANTIZE_X => "quantize_x",
    MM_ID => "mm_id",
    EMBED => "embed",
}

/// The weight-format preludes.
pub const FORMATS: &[Kernel] = &[
    Kernel::Q_F32,
    Kernel::Q_F16,
    Kernel::Q_BF16,
    Kernel::Q_Q8_0,
    Kernel::Q_Q4_0,
    Kernel::Q_Q4_1,
    Kernel::Q_Q4_K,
    Kernel::Q_Q6_K,
];

/// The kernels that call `load8`, each compiled with one of [`FORMATS`] in front.
pub const WEIGHT_READERS: &[Kernel] =
    &[Kernel::MM_ROWS, Kernel::MM_TILE, Kernel::MM_COOP, Kernel::MM_ID, Kernel::EMBED];

/// The x preludes: how a matrix kernel binds its input rows.
pub const X_PRELUDES: &[Kernel] = &[Kernel::X_STORAGE, Kernel::X_UNIFORM];

/// The kernels that read `x` (binding 2) from an x prelude, compiled after the format's.
pub const X_READERS: &[Kernel] = &[Kernel::MM_ROWS, Kernel::MM_TILE];

/// The cooperative-matrix preludes, one per matrix size (8x8x8, 16x16x16): what `mm_coop`
/// is compiled with first, before a format and `x_storage`.
pub const COOP_PRELUDES: &[Kernel] = &[Kernel::COOP_8, Kernel::COOP_16];

/// The kernels compiled with the Q8_0 prelude alone, for its bindings: the integer-dot path.
pub const Q8_0_READERS: &[Kernel] = &[Kernel::MM_DOT];
