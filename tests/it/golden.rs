//! The shared goldens (`tests/fixtures/*.golden.json`) and how close is close.

#![allow(dead_code)]

use serde_json::Value;

/// Every one of the reference's top-16 logits must be this close (the bar).
pub const LOGIT_TOLERANCE: f32 = 0.05;
/// Below this top-two gap the reference itself is a near-tie that rounding may flip.
pub const NEAR_TIE: f64 = 0.005;

pub struct Sequence {
    pub prompt: String,
    pub prompt_ids: Vec<u32>,
    /// The teacher-forced ids (prompt followed by a continuation).
    pub forced_ids: Vec<u32>,
    /// Per forced position: the reference's top-16 (id, logit).
    pub ref_topk: Vec<Vec<(u32, f32)>>,
    pub ref_greedy_ids: Vec<u32>,
    pub ref_greedy_gaps: Vec<f64>,
}

impl Sequence {
    /// How many leading greedy tokens must match: up to the first near-tie.
    pub fn greedy_must_match(&self) -> usize {
        self.ref_greedy_gaps.iter().position(|&g| g < NEAR_TIE).unwrap_or(self.ref_greedy_gaps.len())
    }
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().expect("id array").iter().map(|x| x.as_u64().expect("id") as u32).collect()
}

pub fn sequences(golden: &Value) -> Vec<Sequence> {
    golden["sequences"]
        .as_array()
        .expect("sequences")
        .iter()
        .map(|s| Sequence {
            prompt: s["prompt"].as_str().expect("prompt").to_owned(),
            prompt_ids: ids(&s["prompt_ids"]),
            forced_ids: ids(&s["teacher_forced"]["ids"]),
            ref_topk: s["ref_teacher_forced"]["topk"]
                .as_array()
                .expect("topk")
                .iter()
                .map(|pos| {
                    pos.as_array()
                        .expect("pairs")
                        .iter()
                        .map(|p| (p[0].as_u64().expect("id") as u32, p[1].as_f64().expect("logit") as f32))
                        .collect()
                })
                .collect(),
            ref_greedy_ids: ids(&s["ref_greedy_ids"]),
            ref_greedy_gaps: s["ref_greedy_gaps"]
                .as_array()
                .expect("gaps")
                .iter()
                .map(|g| g.as_f64().expect("gap"))
                .collect(),
        })
        .collect()
}

/// A sequence's `ref_mtp` rows (MTP fixtures): row t is the reference MTP head's top-16
/// (id, logit) for position t + 2, from the hidden state at t and token t + 1.
pub fn mtp_rows(raw: &Value) -> Vec<Vec<(u32, f32)>> {
    raw["ref_mtp"]
        .as_array()
        .expect("ref_mtp")
        .iter()
        .map(|row| {
            row.as_array()
                .expect("pairs")
                .iter()
                .map(|p| (p[0].as_u64().expect("id") as u32, p[1].as_f64().expect("logit") as f32))
                .collect()
        })
        .collect()
}

/// Checks one position's logits against the reference's top-16; returns the worst error.
#[track_caller]
pub fn check_position(what: &str, pos: usize, logits: &[f32], topk: &[(u32, f32)]) -> f32 {
    let mut worst = 0f32;
    for &(id, want) in topk {
        let got = logits[id as usize];
        let err = (got - want).abs();
        assert!(
            err <= LOGIT_TOLERANCE,
            "{what}: position {pos}, token {id}: logit {got}, reference {want} (error {err} > {LOGIT_TOLERANCE})"
        );
        worst = worst.max(err);
    }
    worst
}

/// Checks generated ids against the reference's greedy ids up to the first near-tie.
#[track_caller]
pub fn check_greedy(what: &str, seq: &Sequence, generated: &[u32]) {
    let n = seq.greedy_must_match();
    assert!(generated.len() >= n, "{what}: generated {} tokens, need at least {n}", generated.len());
    assert_eq!(
        &generated[..n],
        &seq.ref_greedy_ids[..n],
        "{what}: greedy ids differ before the first near-tie (step {n})"
    );
}
