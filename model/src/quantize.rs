//! Re-quantising a whole GGUF file (`strata quantize`).

use std::path::Path;

use crate::gguf::{Gguf, GgufWriter, TensorData, TensorInfo, Value};
use crate::quant::{GgmlType, dequantize, quantize_q8_0};
use crate::{Error, Result};

/// llama.cpp's `general.file_type` for "mostly Q8_0".
const FILE_TYPE_Q8_0: u32 = 7;
/// The quantisation format version llama.cpp writes.
const QUANTIZATION_VERSION: u32 = 2;

/// What [`quantize_file`] did.
#[derive(Debug, Clone, Default)]
pub struct QuantizeReport {
    pub quantized: usize,
    pub kept: usize,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

/// Whether llama.cpp's quantiser would quantise this tensor: matrices whose rows are
/// whole blocks; vectors (norms, biases) and the DeltaNet conv kernel stay as they are.
fn should_quantize(t: &TensorInfo, target: GgmlType) -> bool {
    t.dims.len() >= 2
        && t.row_len().is_multiple_of(target.block_len())
        && t.name.ends_with(".weight")
        && !t.name.contains("ssm_conv1d")
}

/// The `N` of a `blk.N.` tensor name, or -1 (as llama.cpp's `sscanf` leaves it).
fn layer_of(name: &str) -> i64 {
    name.strip_prefix("blk.").and_then(|r| r.split_once('.')).and_then(|(n, _)| n.parse().ok()).unwrap_or(-1)
}

/// Writes `input` to `out` with every matrix in `target` (only Q8_0 is supported),
/// following llama.cpp's Q8_0 rule bit for bit. `progress(done, total)` is called per tensor.
pub fn quantize_file(
    input: &Gguf,
    out: &Path,
    target: GgmlType,
    mut progress: impl FnMut(usize, usize),
) -> Result<QuantizeReport> {
    if target != GgmlType::Q8_0 {
        return Err(Error::UnsupportedType(format!("{target} as a quantisation target (supported: Q8_0)")));
    }
    let mut w = GgufWriter::new();
    // llama.cpp's gguf_set_val removes a key and appends it again, so these two end up
    // last, in this order: matching that keeps the output identical to llama.cpp's.
    const MOVED: [&str; 2] = ["general.quantization_version", "general.file_type"];
    for (k, v) in input.metadata.iter().filter(|(k, _)| !MOVED.contains(&k.as_str())) {
        w.set(k.clone(), v.clone())?;
    }
    w.set(MOVED[0], Value::U32(QUANTIZATION_VERSION))?;
    w.set(MOVED[1], Value::U32(FILE_TYPE_Q8_0))?;
    let mut report = QuantizeReport::default();
    let total = input.tensors.len();
    // llama.cpp's quantiser walks tensors in its loader's order (by layer number, then
    // by name; non-layer tensors first); doing the same makes the output byte-identical.
    let mut tensors: Vec<&TensorInfo> = input.tensors.iter().collect();
    tensors.sort_by(|a, b| (layer_of(&a.name), a.name.as_bytes()).cmp(&(layer_of(&b.name), b.name.as_bytes())));
    for (i, t) in tensors.into_iter().enumerate() {
        let data = input.tensor_data(t);
        report.bytes_in += t.size;
        let (ty, bytes) = if should_quantize(t, target) && t.ty != target {
            if !t.ty.is_supported() {
                return Err(Error::UnsupportedType(format!("{} (tensor `{}`)", t.ty, t.name)));
            }
            report.quantized += 1;
            (target, quantize_q8_0(&dequantize(t.ty, data)?))
        } else {
            report.kept += 1;
            (t.ty, data.to_vec())
        };
        report.bytes_out += bytes.len() as u64;
        w.add_tensor(t.name.clone(), ty, t.dims.clone(), TensorData::Bytes(bytes))?;
        progress(i + 1, total);
    }
    w.write(out)?;
    tracing::info!(quantized = report.quantized, kept = report.kept, bytes_out = report.bytes_out, "quantized");
    Ok(report)
}
