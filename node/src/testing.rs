//! Test support for kernel tests: one shared device, a seeded RNG, tolerant comparison.

use std::sync::OnceLock;

use crate::gpu::{Gpu, GpuConfig, KernelCache};

/// The test device (lavapipe in CI) and its kernel cache, opened once per test binary.
pub fn gpu() -> &'static (Gpu, KernelCache) {
    static GPU: OnceLock<(Gpu, KernelCache)> = OnceLock::new();
    GPU.get_or_init(|| {
        let gpu = Gpu::new(&GpuConfig::default()).expect("a GPU adapter (install mesa-vulkan-drivers for lavapipe)");
        (gpu, KernelCache::new())
    })
}

/// splitmix64: small, seeded, reproducible.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    pub fn f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.f32() * scale).collect()
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }
}

/// Asserts `|got - want| <= atol + rtol * |want|` everywhere, naming the first miss.
#[track_caller]
pub fn assert_close(got: &[f32], want: &[f32], atol: f32, rtol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut worst = (0usize, 0f32);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs();
        assert!(g.is_finite(), "{what}: element {i} is {g}");
        if err > atol + rtol * w.abs() {
            panic!("{what}: element {i}: got {g}, want {w} (err {err}, atol {atol}, rtol {rtol})");
        }
        if err > worst.1 {
            worst = (i, err);
        }
    }
    tracing::debug!(what, worst_index = worst.0, worst_err = worst.1, "compared");
}
