//! The MTP block's row inputs: each row's token id and the hidden state it pairs with,
//! from where the host's table says (`mtp_select.wgsl`).

use strata_shaders::Kernel;

use super::recorder::{Act, Recorder};
use crate::gpu::{Dim, Workgroups};
use crate::{Error, Result};

/// Threads per workgroup of `mtp_select.wgsl`.
const WG: u32 = 256;

/// A source code naming a row of the other buffer: `kept` for hidden states, `picks` for
/// tokens (the WGSL `ELSEWHERE`).
pub const ELSEWHERE: u32 = 0x8000_0000;
/// A hidden source of zeros (the WGSL `NONE`).
pub const NO_HIDDEN: u32 = u32::MAX;

#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct Params {
    n: u32,
    words: u32,
    _pad: [u32; 2],
}

/// Where [`Recorder::mtp_select`] takes its rows from.
#[derive(Debug, Clone, Copy)]
pub struct MtpSources<'a> {
    /// u32 `[rows, 2]`: per row (hidden source, token source).
    pub src: Act<'a>,
    /// Hidden rows named by index (bound whole).
    pub hidden: Act<'a>,
    /// Hidden rows named by `ELSEWHERE | index` (bound whole).
    pub kept: Act<'a>,
    /// Top-k output rows of `words` words, whose best id a token source
    /// `ELSEWHERE | index` names (bound whole).
    pub picks: &'a wgpu::Buffer,
    pub words: u32,
}

impl Recorder<'_> {
    /// For each of the step's rows `r`: `ids[r]` = its token (an id, or the best candidate
    /// of a row of `picks`), `out[r]` = its hidden row (of `hidden` or `kept`, or zeros).
    pub fn mtp_select(&mut self, from: MtpSources<'_>, ids: Act<'_>, out: Act<'_>) -> Result<()> {
        let op = "mtp_select";
        let n = out.width;
        if from.hidden.width != n || from.kept.width != n || n == 0 || from.words == 0 {
            let message = format!(
                "hidden rows of {} and {} into rows of {n}, picks of {} words",
                from.hidden.width, from.kept.width, from.words
            );
            return Err(Error::Shape { op, message });
        }
        let whole = |act: Act<'_>| u64::from(act.rows) * u64::from(act.width) * 4;
        let src = self.bind_act(op, "src", from.src, 2)?;
        let hidden = self.bind(op, "hidden", from.hidden.buffer, whole(from.hidden))?;
        let kept = self.bind(op, "kept", from.kept.buffer, whole(from.kept))?;
        let picks = self.bind(op, "picks", from.picks, from.picks.size())?;
        let ids = self.bind_act(op, "ids", ids, 1)?;
        let out = self.bind_act(op, "out", out, n)?;
        let params = self.uniform(op, &Params { n, words: from.words, _pad: [0; 2] });
        let pipeline = self.pipeline(Kernel::MTP_SELECT, &[], &[])?;
        let workgroups = Workgroups(Dim::Fixed(n.div_ceil(WG)), Dim::Tokens { group: 1 }, Dim::Fixed(1));
        self.dispatch(op, pipeline, &params, &[src, hidden, kept, picks, ids, out], workgroups);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::harness::{f32_buffer, record, run, step_buffer};
    use crate::testing::gpu;

    #[test]
    fn mtp_select_takes_each_row_from_where_the_table_says() {
        let (gpu, _) = gpu();
        let n = 300u32;
        let hidden: Vec<f32> = (0..3 * n).map(|i| i as f32).collect();
        let kept: Vec<f32> = (0..2 * n).map(|i| -(i as f32) - 1.0).collect();
        // Two top-k rows of 4 words: best ids 77 and 91.
        let picks = [77u32, 5, 0, 0, 91, 6, 0, 0];
        let src = [[2u32, 11], [ELSEWHERE | 1, ELSEWHERE | 1], [NO_HIDDEN, ELSEWHERE], [0, 12]];
        let step = step_buffer(gpu);
        let (hb, kb) = (f32_buffer(gpu, &hidden), f32_buffer(gpu, &kept));
        let pb = gpu.storage_init("picks", bytemuck::cast_slice(&picks));
        let sb = gpu.storage_init("src", bytemuck::cast_slice(&src));
        let ib = gpu.storage("ids", 4 * 4);
        let ob = f32_buffer(gpu, &vec![7.0; 4 * n as usize]);
        let from = MtpSources {
            src: Act::new(&sb, 4, 2),
            hidden: Act::new(&hb, 3, n),
            kept: Act::new(&kb, 2, n),
            picks: &pb,
            words: 4,
        };
        let d = record(&step, 4, |rec| rec.mtp_select(from, Act::new(&ib, 4, 1), Act::new(&ob, 4, n))).unwrap();
        run(gpu, &step, &d, 3);
        assert_eq!(gpu.read_u32(&ib, 3).unwrap(), [11, 91, 77]);
        let out = gpu.read_f32(&ob, 4 * n as usize).unwrap();
        let row = |r: usize| &out[r * n as usize..(r + 1) * n as usize];
        assert_eq!(row(0), &hidden[2 * n as usize..]);
        assert_eq!(row(1), &kept[n as usize..]);
        assert!(row(2).iter().all(|&v| v == 0.0));
        assert!(row(3).iter().all(|&v| v == 7.0), "a row past the step was written");
    }
}
