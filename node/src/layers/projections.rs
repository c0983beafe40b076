//! Several matrices of one input (attention's q, k and v; a feed-forward's gate and up;
//! DeltaNet's four input projections), run as few products as their formats allow: those
//! stored alike are loaded end to end as one matrix, whose one dispatch writes each
//! output ([`Recorder::matmul_into`]). Fewer dispatches per layer, and x read once for
//! them; every output's values are the same as when its matrix runs alone.

use strata_model::arch::TensorSpec;

use super::LoadCtx;
use crate::Result;
use crate::ops::matmul::MAX_OUTPUTS;
use crate::ops::{Act, Recorder};
use crate::weights::QuantMatrix;

pub struct Projections {
    /// Each product, with the outputs (by index in the load's order) it writes.
    groups: Vec<(QuantMatrix, Vec<usize>)>,
    outputs: usize,
}

impl Projections {
    /// The matrices `specs`, those of one format and width together (in their order), at
    /// most [`MAX_OUTPUTS`] a product.
    pub fn load(ctx: &LoadCtx, specs: &[&TensorSpec]) -> Result<Projections> {
        // Each matrix's format and width, looked up (and its shape checked) once.
        let kinds = specs.iter().map(|s| Ok((ctx.tensor(s)?.ty, s.k()))).collect::<Result<Vec<_>>>()?;
        let mut members: Vec<Vec<usize>> = Vec::new();
        for (i, kind) in kinds.iter().enumerate() {
            match members.iter_mut().find(|g| g.len() < MAX_OUTPUTS && kinds[g[0]] == *kind) {
                Some(g) => g.push(i),
                None => members.push(vec![i]),
            }
        }
        let mut groups = Vec::with_capacity(members.len());
        for g in members {
            let group_specs: Vec<&TensorSpec> = g.iter().map(|&i| specs[i]).collect();
            let fused = if g.len() > 1 { ctx.fused(&group_specs)? } else { None };
            match fused {
                Some(w) => groups.push((w, g)),
                // One matrix, or rows not of whole blocks: each alone (whose upload says
                // what is wrong).
                _ => {
                    for i in g {
                        groups.push((ctx.matrix(specs[i])?, vec![i]));
                    }
                }
            }
        }
        Ok(Projections { groups, outputs: specs.len() })
    }

    /// Bytes of the weights held.
    pub fn bytes(&self) -> u64 {
        self.groups.iter().map(|(w, _)| w.bytes()).sum()
    }

    /// Records `outs[i] = W_i x` for every matrix, in the load's order.
    pub fn record(&self, rec: &mut Recorder, x: Act<'_>, outs: &[Act<'_>]) -> Result<()> {
        if outs.len() != self.outputs {
            return Err(crate::Error::Shape {
                op: "matmul",
                message: format!("{} outputs for {} projections", outs.len(), self.outputs),
            });
        }
        for (w, members) in &self.groups {
            let group_outs: Vec<Act<'_>> = members.iter().map(|&i| outs[i]).collect();
            rec.matmul_into(w, x, &group_outs, false)?;
        }
        Ok(())
    }
}
