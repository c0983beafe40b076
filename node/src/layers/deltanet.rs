//! qwen35's Gated DeltaNet mixer (see `docs/qwen35.md`):
//! `x += W_ssm_out gated_norm(delta_rule(conv(W_qkv n)), W_gate n)`, `n` the normed input,
//! over a per-sequence [`DeltaNetState`] instead of a KV cache.

use strata_model::arch::DeltaNetTensors;
use strata_model::config::{DeltaNetConfig, ModelConfig};

use super::LoadCtx;
use super::projections::Projections;
use crate::deltanet_state::DeltaNetState;
use crate::gpu::Gpu;
use crate::ops::deltanet::Gates;
use crate::ops::{Act, Recorder};
use crate::scratch::Scratch;
use crate::weights::QuantMatrix;
use crate::{Error, Result};

pub struct DeltaNet {
    /// `attn_qkv`, `attn_gate` (`z`, the output gate), `ssm_beta` and `ssm_alpha`.
    inputs: Projections,
    /// f32 `[channels, conv_kernel]`.
    ssm_conv1d: wgpu::Buffer,
    /// f32 `[2, n_value_heads]`: `ssm_a`, then `ssm_dt.bias` (one binding for the kernel).
    gate_consts: wgpu::Buffer,
    ssm_norm: wgpu::Buffer,
    ssm_out: QuantMatrix,
}

/// The DeltaNet config of a qwen35 model, or why there is none.
pub fn config(cfg: &ModelConfig) -> Result<&DeltaNetConfig> {
    cfg.deltanet
        .as_ref()
        .ok_or_else(|| Error::Spec(format!("a {} model has no Gated DeltaNet layers", cfg.arch.name())))
}

impl DeltaNet {
    pub fn load(ctx: &LoadCtx, t: &DeltaNetTensors) -> Result<DeltaNet> {
        Ok(DeltaNet {
            inputs: Projections::load(ctx, &[&t.qkv, &t.gate, &t.beta, &t.alpha])?,
            // ggml `[kernel, channels]`: a row of taps per channel, as the kernel reads it.
            ssm_conv1d: ctx.vector(&t.conv1d)?,
            gate_consts: ctx.vectors("gate consts", &[&t.a, &t.dt_bias])?,
            ssm_norm: ctx.vector(&t.norm)?,
            ssm_out: ctx.matrix(&t.out)?,
        })
    }

    /// Bytes of weights held on the GPU (all read by every step).
    pub fn bytes(&self) -> u64 {
        let vectors: u64 = [&self.ssm_conv1d, &self.gate_consts, &self.ssm_norm].map(|b| b.size()).iter().sum();
        self.inputs.bytes() + self.ssm_out.bytes() + vectors
    }

    /// Records `x += mixer(n)` for the step's rows, each sequence advancing its own slot of
    /// `state`; `n` is the sub-block's normed input.
    pub fn record(&self, rec: &mut Recorder, cfg: &ModelConfig, s: &Scratch, state: &DeltaNetState) -> Result<()> {
        let dn = config(cfg)?;
        if state.config() != dn {
            return Err(Error::Shape {
                op: "deltanet",
                message: format!("a DeltaNet state of {:?} for a layer of {dn:?}", state.config()),
            });
        }
        let d = s.deltanet()?;
        self.inputs.record(rec, s.n(), &[d.qkv(), d.z(), d.b(), d.a()])?;
        rec.deltanet_conv(state, d.qkv(), &self.ssm_conv1d, d.y(), s.batch(), cfg.eps)?;
        let gates = Gates { b: d.b(), a: d.a(), consts: &self.gate_consts };
        rec.delta_rule(state, d.y(), gates, d.o(), &s.seqs)?;
        rec.gated_norm(d.o(), d.z(), &self.ssm_norm, dn.head_dim as u32, cfg.eps)?;
        rec.matmul(&self.ssm_out, d.o(), s.x(), true)
    }
}

/// The activations of the DeltaNet layers beyond [`Scratch`]'s, sized for a stage's largest
/// batch and shared by its DeltaNet layers and sequences.
pub struct DeltaNetScratch {
    max_tokens: u32,
    config: DeltaNetConfig,
    /// f32 `[max_tokens, channels]`: `W_qkv n`.
    pub qkv: wgpu::Buffer,
    /// f32 `[max_tokens, channels]`: the conv's output, q and k normed.
    pub y: wgpu::Buffer,
    /// f32 `[max_tokens, n_value_heads * head_dim]`: `W_gate n`.
    pub z: wgpu::Buffer,
    /// f32 `[max_tokens, n_value_heads]`: `W_beta n` and `W_alpha n`.
    pub b: wgpu::Buffer,
    pub a: wgpu::Buffer,
    /// f32 `[max_tokens, n_value_heads * head_dim]`: the heads' outputs, before `W_ssm_out`.
    pub o: wgpu::Buffer,
}

impl DeltaNetScratch {
    pub fn new(gpu: &Gpu, cfg: &ModelConfig, max_tokens: u32) -> Result<DeltaNetScratch> {
        let dn = config(cfg)?;
        let f32s = |label: &str, width: usize| gpu.storage(label, u64::from(max_tokens) * width as u64 * 4);
        Ok(DeltaNetScratch {
            max_tokens,
            config: dn.clone(),
            qkv: f32s("deltanet qkv", dn.conv_channels()),
            y: f32s("deltanet y", dn.conv_channels()),
            z: f32s("deltanet z", dn.value_dim()),
            b: f32s("deltanet b", dn.n_value_heads),
            a: f32s("deltanet a", dn.n_value_heads),
            o: f32s("deltanet o", dn.value_dim()),
        })
    }

    fn act<'a>(&self, buffer: &'a wgpu::Buffer, width: usize) -> Act<'a> {
        Act::new(buffer, self.max_tokens, width as u32)
    }

    pub fn qkv(&self) -> Act<'_> {
        self.act(&self.qkv, self.config.conv_channels())
    }

    pub fn y(&self) -> Act<'_> {
        self.act(&self.y, self.config.conv_channels())
    }

    pub fn z(&self) -> Act<'_> {
        self.act(&self.z, self.config.value_dim())
    }

    pub fn b(&self) -> Act<'_> {
        self.act(&self.b, self.config.n_value_heads)
    }

    pub fn a(&self) -> Act<'_> {
        self.act(&self.a, self.config.n_value_heads)
    }

    pub fn o(&self) -> Act<'_> {
        self.act(&self.o, self.config.value_dim())
    }
}

#[cfg(test)]
mod tests {
    use strata_model::config::LayerKind;
    use strata_model::gguf::Gguf;
    use strata_model::reference::deltanet::DeltaNet as CpuDeltaNet;
    use strata_model::reference::ops::rms_norm;

    use strata_model::arch::MixerTensors;

    use super::*;
    use crate::batch::{BatchLayout, Run};
    use crate::gpu::{Step, encode_pass};
    use crate::ops::norm::RmsNorm;
    use crate::testing::{Rng, assert_close, gpu};

    const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/tiny-qwen35.gguf");

    /// Layer 0 of the tiny qwen35 model on 12 random hidden states, a prefill of 8 then 4
    /// decode steps, against the CPU reference (itself checked against llama.cpp) fed one
    /// token at a time.
    #[test]
    fn layer_matches_the_reference_over_prefill_and_decode() {
        let (gpu, kernels) = gpu();
        let gguf = Gguf::open(FIXTURE).unwrap();
        let cfg = ModelConfig::from_gguf(&gguf).unwrap();
        assert_eq!(cfg.layers[0], LayerKind::DeltaNet);
        let ctx = LoadCtx { gguf: &gguf, gpu, kernels };
        let tensors = cfg.layer_tensors(0);
        let MixerTensors::DeltaNet(dn_tensors) = &tensors.mixer else { panic!("layer 0 is DeltaNet") };
        let layer = DeltaNet::load(&ctx, dn_tensors).unwrap();
        let attn_norm_buf = ctx.vector(&tensors.attn_norm).unwrap();
        assert!(layer.bytes() > 0);

        // Bound for more tokens than the prefill has.
        let max_tokens = 10u32;
        let s = Scratch::new(gpu, &cfg, max_tokens, 2, true, None).unwrap();
        let state = DeltaNetState::new(gpu, config(&cfg).unwrap(), 2).unwrap();
        let record = |max_tokens| {
            let mut rec = Recorder::new(gpu, kernels, &s.step, max_tokens).unwrap();
            rec.rms_norm(s.x(), &attn_norm_buf, s.n(), RmsNorm::new(cfg.n_embd as u32, 1, cfg.eps)).unwrap();
            layer.record(&mut rec, &cfg, &s, &state).unwrap();
            rec.finish()
        };
        let (prefill, decode) = (record(max_tokens), record(1));

        let mut cpu = CpuDeltaNet::load(&gguf, &cfg, 0).unwrap();
        let norm_t = gguf.require_tensor("blk.0.attn_norm.weight").unwrap();
        let attn_norm = strata_model::quant::dequantize(norm_t.ty, gguf.tensor_data(norm_t)).unwrap();

        let e = cfg.n_embd;
        let mut rng = Rng::new(7);
        let mut pos = 0u32;
        for n in [8usize, 1, 1, 1, 1] {
            let x = rng.vec(n * e, 1.0);
            gpu.queue.write_buffer(&s.x, 0, bytemuck::cast_slice(&x));
            // The sequence in slot 1.
            let layout = BatchLayout::new(&[Run { slot: 1, pos, n: n as u32, keep: 0 }]);
            gpu.queue.write_buffer(&s.positions, 0, bytemuck::cast_slice(&layout.positions));
            gpu.queue.write_buffer(&s.rows, 0, bytemuck::cast_slice(&layout.rows));
            gpu.queue.write_buffer(&s.seqs, 0, bytemuck::cast_slice(&layout.seqs));
            let step = Step::new(n as u32, 1);
            gpu.queue.write_buffer(&s.step, 0, bytemuck::bytes_of(&step));
            let mut enc = gpu.device.create_command_encoder(&Default::default());
            encode_pass(&mut enc, &[(if n == 1 { &decode } else { &prefill }, step)]);
            gpu.queue.submit([enc.finish()]);
            let got = gpu.read_f32(&s.x, n * e).unwrap();
            // Compare what the layer added, not the residual it added it to.
            let got_mixed: Vec<f32> = got.iter().zip(&x).map(|(g, x)| g - x).collect();
            let want: Vec<f32> =
                x.chunks_exact(e).flat_map(|row| cpu.forward(&rms_norm(row, &attn_norm, cfg.eps), &cfg)).collect();
            let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert_close(&got_mixed, &want, 1e-4 * scale, 1e-4, &format!("{n} tokens at position {pos}"));
            pos += n as u32;
        }
    }
}
