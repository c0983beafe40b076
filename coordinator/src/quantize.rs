//! `strata quantize`.

use anyhow::Context;
use strata_model::gguf::Gguf;
use strata_model::quant::GgmlType;

use crate::cli::QuantizeArgs;

pub fn run(args: QuantizeArgs) -> anyhow::Result<()> {
    let target = GgmlType::parse(&args.r#type).with_context(|| format!("--type {}", args.r#type))?;
    let input = Gguf::open(&args.input).with_context(|| format!("reading {}", args.input.display()))?;
    let pb = crate::progress::bar(input.tensors.len() as u64, "quantizing");
    let report =
        strata_model::quantize::quantize_file(&input, &args.output, target, |done, _| pb.set_position(done as u64))
            .with_context(|| format!("writing {}", args.output.display()))?;
    pb.finish_and_clear();
    eprintln!(
        "wrote {}: {} tensors quantized to {target}, {} kept, {:.1} MB -> {:.1} MB",
        args.output.display(),
        report.quantized,
        report.kept,
        report.bytes_in as f64 / 1e6,
        report.bytes_out as f64 / 1e6
    );
    Ok(())
}
