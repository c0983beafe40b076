//! Test support for kernel tests: one shared device, a seeded RNG, tolerant comparison,
//! and processes whose products go through cooperative matrices. Also built for other
//! crates' tests with the `test-support` feature.

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

/// Set in a test process [`in_coop_child`] started: the test runs its checks.
const COOP_CHILD: &str = "STRATA_TEST_COOP_CHILD";

/// A lavapipe that offers cooperative matrices, unpacked with its own C library: the
/// system's (Mesa 22.3 in CI) offers none; Mesa 26's does (8x8x8, f16 products summed in
/// f32), and `scripts/lavapipe-coop.sh` unpacks it into `.lavapipe-coop/` at the
/// workspace's root (or `$STRATA_COOP_LAVAPIPE`).
fn coop_lavapipe() -> std::path::PathBuf {
    std::env::var_os("STRATA_COOP_LAVAPIPE")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.lavapipe-coop"))
}

/// A command that runs `program` with every matrix product through cooperative matrices
/// (`STRATA_COOP_MATRIX=on`): under [`coop_lavapipe`], started through its C library's
/// loader, where it has been unpacked; else on this machine's own driver (which then
/// must offer them, or the program fails saying so).
pub fn coop_command(program: &std::path::Path) -> std::process::Command {
    let dir = coop_lavapipe();
    let mut cmd = if dir.join("lvp.json").is_file() {
        let lib = dir.join("lib");
        let mut c = std::process::Command::new(lib.join("ld-linux-x86-64.so.2"));
        c.arg("--library-path").arg(&lib).arg(program).env("VK_ICD_FILENAMES", dir.join("lvp.json"));
        c
    } else {
        eprintln!("{}: no such lavapipe (run scripts/lavapipe-coop.sh); trying this machine's driver", dir.display());
        std::process::Command::new(program)
    };
    // Mesa 26's lavapipe offers them at its native 256-bit vectors only: CI's second pass
    // of the kernel tests at 128 bits (subgroups of 4) would find none.
    cmd.env("STRATA_COOP_MATRIX", "on").env_remove("LP_NATIVE_VECTOR_WIDTH");
    cmd
}

/// Runs the test `name` (its path in this test binary) again in a child process of
/// [`coop_command`], so that the shared [`gpu`] computes matrix products through
/// cooperative matrices; returns `true` in that child, where the caller then runs its
/// checks, and `false` in the parent once the child passed.
pub fn in_coop_child(name: &str) -> bool {
    if std::env::var_os(COOP_CHILD).is_some() {
        return true;
    }
    let exe = std::env::current_exe().expect("the test binary's path");
    let out = coop_command(&exe)
        .args([name, "--exact", "--nocapture", "--test-threads", "1"])
        .env(COOP_CHILD, "1")
        .output()
        .expect("start the test's child");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    eprintln!("{stdout}{stderr}");
    assert!(out.status.success() && stdout.contains("1 passed"), "{name} under cooperative matrices: {}", out.status);
    false
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
