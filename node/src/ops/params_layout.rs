//! Each `#[repr(C)]` params struct written to a uniform must match, byte for byte, the
//! WGSL struct its kernels bind there: same size, and each field at the same offset with
//! the same scalar type. WGSL's side comes from naga's front end and layouter.
//!
//! The Rust fields are private to their op modules, out of `offset_of!`'s reach from
//! here, so the Rust side is read off the derived `Debug` of a value whose 4-byte word `i`
//! holds the bits `MARK + i`: each field prints the marks of the words it covers.

use std::collections::BTreeSet;
use std::fmt::Debug;

use naga::proc::Layouter;
use strata_shaders::Kernel;
use strata_shaders::matmul::{FORMATS, Q8_0_READERS, WEIGHT_READERS, X_PRELUDES, X_READERS};

/// Word `i` of the probe value: 2.0f32 plus a few ulps as an f32, a large integer as a
/// u32, so that either reading names the word.
const MARK: u32 = 0x4000_0000;

/// What one 4-byte word of a params struct is: the field's name (`pad` for any
/// padding) and scalar type.
type Word = (String, &'static str);

fn pad_or(name: &str) -> String {
    if name.trim_start_matches('_').starts_with("pad") { "pad".to_owned() } else { name.to_owned() }
}

/// The word index a printed mark stands for, and its type.
fn mark(text: &str, words: usize) -> (usize, &'static str) {
    let (bits, ty) = match text.parse::<u32>() {
        Ok(u) => (u, "u32"),
        Err(_) => (text.parse::<f32>().unwrap_or_else(|_| panic!("unexpected field value {text}")).to_bits(), "f32"),
    };
    let i = bits.wrapping_sub(MARK) as usize;
    assert!(i < words, "{text} is no mark of a word");
    (i, ty)
}

/// The words of `T`, from its `Debug` form `Name { a: .., b: [.., ..] }`.
fn rust_words<T: bytemuck::Pod + Debug>() -> Vec<Word> {
    let size = size_of::<T>();
    assert_eq!(size % 4, 0, "{} is not whole words", std::any::type_name::<T>());
    let n = size / 4;
    let bytes: Vec<u8> = (0..n as u32).flat_map(|i| (MARK + i).to_ne_bytes()).collect();
    let value: T = bytemuck::pod_read_unaligned(&bytes);
    let text = format!("{value:?}");
    let body = text.split_once(" { ").and_then(|(_, b)| b.strip_suffix(" }")).unwrap_or_else(|| panic!("{text}"));
    let mut words: Vec<Option<Word>> = vec![None; n];
    let mut put = |i: usize, name: &str, ty: &'static str| {
        assert!(words[i].replace((pad_or(name), ty)).is_none(), "{text}: word {i} twice");
    };
    // Fields are scalars or arrays of them; split at the commas outside brackets.
    let mut depth = 0;
    let mut start = 0;
    let mut fields = Vec::new();
    for (at, c) in body.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => depth -= 1,
            ',' if depth == 0 => {
                fields.push(&body[start..at]);
                start = at + 1;
            }
            _ => {}
        }
    }
    fields.push(&body[start..]);
    for field in fields {
        let (name, value) = field.trim().split_once(": ").unwrap_or_else(|| panic!("{text}"));
        match value.strip_prefix('[').and_then(|v| v.strip_suffix(']')) {
            Some(items) => items.split(", ").for_each(|v| {
                let (i, ty) = mark(v, n);
                put(i, name, ty);
            }),
            None => {
                let (i, ty) = mark(value, n);
                put(i, name, ty);
            }
        }
    }
    words.into_iter().enumerate().map(|(i, w)| w.unwrap_or_else(|| panic!("{text}: word {i} is in no field"))).collect()
}

/// `kernel` as it is compiled (weight readers with the f32 prelude).
fn source(kernel: Kernel) -> String {
    let mut preludes = Vec::new();
    if kernel == Kernel::MM_COOP {
        preludes.push(Kernel::COOP_8);
    }
    if WEIGHT_READERS.contains(&kernel) {
        preludes.push(Kernel::Q_F32);
    }
    if Q8_0_READERS.contains(&kernel) {
        preludes.push(Kernel::Q_Q8_0);
    }
    if X_READERS.contains(&kernel) || kernel == Kernel::MM_COOP {
        preludes.push(Kernel::X_STORAGE);
    }
    kernel.assemble(&preludes, &[]).unwrap_or_else(|e| panic!("{}: {e}", kernel.name))
}

fn uniforms(kernel: Kernel) -> Vec<(u32, Vec<Word>, String)> {
    uniforms_of(kernel.name, &source(kernel))
}

/// The uniforms of a WGSL source: (binding, words of its struct, WGSL struct name).
fn uniforms_of(label: &str, src: &str) -> Vec<(u32, Vec<Word>, String)> {
    let m = naga::front::wgsl::parse_str(src).unwrap_or_else(|e| panic!("{label}: {}", e.emit_to_string(src)));
    let mut layouter = Layouter::default();
    layouter.update(m.to_ctx()).unwrap();
    let mut out = Vec::new();
    for (_, var) in m.global_variables.iter() {
        if var.space != naga::AddressSpace::Uniform {
            continue;
        }
        let b = var.binding.as_ref().expect("a bound uniform");
        assert_eq!(b.group, 0, "{}: uniform outside group 0", label);
        let ty = &m.types[var.ty];
        let naga::TypeInner::Struct { members, span } = &ty.inner else {
            panic!("{}: uniform at {} is no struct", label, b.binding);
        };
        let size = layouter[var.ty].size;
        assert_eq!(size, *span);
        let mut words: Vec<Option<Word>> = vec![None; size as usize / 4];
        for mem in members {
            let name = mem.name.clone().unwrap_or_default();
            let ty = match m.types[mem.ty].inner {
                naga::TypeInner::Scalar(naga::Scalar { kind: naga::ScalarKind::Uint, width: 4 }) => "u32",
                naga::TypeInner::Scalar(naga::Scalar { kind: naga::ScalarKind::Float, width: 4 }) => "f32",
                naga::TypeInner::Scalar(naga::Scalar { kind: naga::ScalarKind::Sint, width: 4 }) => "i32",
                ref other => panic!("{}: {name} is {other:?}; this test knows 4-byte scalars only", label),
            };
            assert_eq!(layouter[mem.ty].size, 4);
            words[mem.offset as usize / 4] = Some((pad_or(&name), ty));
        }
        let words = words.into_iter().map(|w| w.unwrap_or(("(implicit padding)".to_owned(), "-"))).collect();
        out.push((b.binding, words, ty.name.clone().unwrap_or_default()));
    }
    out
}

/// Checks the Rust struct `T` against the uniform at `binding` of each of `kernels`, and
/// records them as covered.
fn check<T: bytemuck::Pod + Debug>(binding: u32, kernels: &[Kernel], covered: &mut BTreeSet<(&'static str, u32)>) {
    let rust = rust_words::<T>();
    let rust_name = std::any::type_name::<T>();
    for &k in kernels {
        let found = uniforms(k).into_iter().find(|(b, ..)| *b == binding);
        let (_, wgsl, wgsl_name) = found.unwrap_or_else(|| panic!("{}: no uniform at binding {binding}", k.name));
        assert_eq!(
            rust, wgsl,
            "{rust_name} vs {} struct {wgsl_name} (binding {binding}), word by word: (field, type)",
            k.name
        );
        covered.insert((k.name, binding));
    }
}

/// One line per Rust params struct: `layout!(covered, Type => binding B of KERNEL, ...)`.
macro_rules! layout {
    ($covered:ident, $ty:ty => binding $binding:literal of $($kernel:ident),+) => {
        check::<$ty>($binding, &[$(Kernel::$kernel),+], &mut $covered)
    };
}

#[test]
fn params_structs_match_their_wgsl_twins() {
    use crate::ops::*;
    let mut covered = BTreeSet::new();
    layout!(covered, matmul::Params => binding 1 of MM_ROWS, MM_TILE, MM_DOT, MM_COOP);
    layout!(covered, matmul::QuantizeParams => binding 1 of QUANTIZE_X);
    layout!(covered, embed::Params => binding 1 of EMBED);
    layout!(covered, norm::Params => binding 1 of RMS_NORM);
    layout!(covered, rope::Params => binding 1 of ROPE);
    layout!(covered, elementwise::Params => binding 1 of SWIGLU, GATHER_ROWS);
    layout!(covered, attention::StoreParams => binding 1 of KV_STORE);
    layout!(covered, attention::AttnParams => binding 1 of ATTENTION, ATTENTION_SG);
    layout!(covered, deltanet::ConvParams => binding 1 of DELTANET_CONV);
    layout!(covered, deltanet::ConvStateParams => binding 1 of DELTANET_CONV_STATE);
    layout!(covered, deltanet::StateParams => binding 1 of DELTANET_STATE);
    layout!(covered, deltanet::NormParams => binding 1 of DELTANET_GATED_NORM);
    layout!(covered, sample::TopKParams => binding 1 of TOP_K);
    layout!(covered, sample::PenalizeParams => binding 1 of PENALIZE);
    layout!(covered, moe::RouteParams => binding 1 of MOE_ROUTE);
    layout!(covered, moe::IdParams => binding 1 of MM_ID);
    layout!(covered, moe::CombineParams => binding 1 of MOE_COMBINE);
    layout!(covered, mtp::Params => binding 1 of MTP_SELECT);

    // The step uniform: binding 0 of every kernel that has one.
    let with_step: Vec<Kernel> = strata_shaders::all()
        .filter(|k| {
            !FORMATS.contains(k)
                && !X_PRELUDES.contains(k)
                && uniforms(*k).iter().any(|(b, _, name)| *b == 0 && name == "Step")
        })
        .collect();
    assert!(with_step.len() >= 15, "{} kernels bind Step", with_step.len());
    check::<crate::gpu::Step>(0, &with_step, &mut covered);

    layout!(covered, crate::bench::Params => binding 0 of READ_BANDWIDTH);

    // No uniform of any kernel is left out (`x_uniform`'s holds a matrix kernel's input
    // rows, not parameters).
    for k in strata_shaders::all().filter(|k| !FORMATS.contains(k) && !X_PRELUDES.contains(k)) {
        for (b, _, name) in uniforms(k) {
            assert!(covered.contains(&(k.name, b)), "{}: uniform {name} at binding {b} has no Rust twin here", k.name);
        }
    }
}

#[test]
fn rust_words_reads_fields_and_padding() {
    #[repr(C)]
    #[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
    struct P {
        a: u32,
        eps: f32,
        _pad: [u32; 2],
    }
    let words = rust_words::<P>();
    let want: Vec<Word> =
        vec![("a".into(), "u32"), ("eps".into(), "f32"), ("pad".into(), "u32"), ("pad".into(), "u32")];
    assert_eq!(words, want);
}

#[test]
fn a_disagreement_is_seen() {
    #[repr(C)]
    #[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
    struct P {
        a: u32,
        eps: f32,
        _pad: [u32; 2],
    }
    let words = |body: &str| {
        let src = format!("struct P {{ {body} }}\n@group(0) @binding(1) var<uniform> p: P;\n");
        uniforms_of("test", &src).remove(0).1
    };
    assert_eq!(rust_words::<P>(), words("a: u32, eps: f32, pad0: u32, pad1: u32"));
    // Swapped, mistyped, renamed.
    for body in [
        "eps: f32, a: u32, pad0: u32, pad1: u32",
        "a: u32, eps: u32, pad0: u32, pad1: u32",
        "b: u32, eps: f32, pad0: u32, pad1: u32",
        "a: u32, eps: f32, pad0: u32",
    ] {
        assert_ne!(rust_words::<P>(), words(body), "{body}");
    }
}
