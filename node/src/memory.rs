//! How much memory a node may use for weights and caches: a probe of the GPU (or the
//! system, for CPU adapters and unified memory) and the `--memory` size syntax.
//!
//! The planner divides the model's layers by these numbers, so a probe errs low: it
//! subtracts a reserve for the driver, the OS and other programs, and it says where the
//! number came from (`MemoryProbe::source`) so that a user can see when it is a guess.

use crate::gpu::Gpu;
use crate::{Error, Result};

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

/// Usable bytes and where the number came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryProbe {
    pub bytes: u64,
    /// `"flag"` (set by the user), `"vulkan-heaps"` (device-local heaps of the GPU),
    /// `"system-available"` (CPU adapter: the OS's available memory), `"unified"`
    /// (Apple: a fraction of system memory), or `"estimate"` (a guess, logged as a warning).
    pub source: &'static str,
}

/// What `--memory` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryLimit {
    /// Probe the device (`usable_memory`).
    Auto,
    Bytes(u64),
}

impl MemoryLimit {
    /// The limit itself, or the probe's answer for `Auto`.
    pub fn resolve(self, probe: impl FnOnce() -> MemoryProbe) -> MemoryProbe {
        match self {
            MemoryLimit::Auto => probe(),
            MemoryLimit::Bytes(bytes) => MemoryProbe { bytes, source: "flag" },
        }
    }
}

impl std::str::FromStr for MemoryLimit {
    type Err = Error;
    fn from_str(s: &str) -> Result<MemoryLimit> {
        parse_size(s)
    }
}

/// Parses `auto`, a byte count, or a number with a unit: `12GiB`, `800MB`, `1.5GB`.
/// Units are case-insensitive; KB/MB/GB/TB are powers of 1000 and KiB/MiB/GiB/TiB powers
/// of 1024. A bare `G` or `M` is refused as ambiguous rather than guessed.
pub fn parse_size(s: &str) -> Result<MemoryLimit> {
    let text = s.trim();
    if text.eq_ignore_ascii_case("auto") {
        return Ok(MemoryLimit::Auto);
    }
    let bad = |why: &str| Error::Setting(format!("memory size `{s}`: {why} (examples: 12GiB, 800MB, 1.5GB, auto)"));
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(text.len());
    let (number, unit) = (&text[..split], text[split..].trim());
    if number.is_empty() {
        return Err(bad(if text.starts_with('-') { "must not be negative" } else { "expected a number" }));
    }
    let multiplier: u128 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        "k" | "m" | "g" | "t" => {
            let u = unit.to_ascii_uppercase();
            return Err(bad(&format!(
                "ambiguous unit `{unit}`: write {u}B (powers of 1000) or {u}iB (powers of 1024)"
            )));
        }
        _ => return Err(bad(&format!("unknown unit `{unit}`"))),
    };
    // Exact decimal arithmetic: "1.5GB" is 1_500_000_000 bytes, not a float's idea of it.
    let (int_part, frac_part) = number.split_once('.').unwrap_or((number, ""));
    if int_part.is_empty() && frac_part.is_empty() || frac_part.contains('.') {
        return Err(bad("expected a number"));
    }
    if frac_part.len() > 12 {
        return Err(bad("too many decimal places"));
    }
    let digits = |d: &str| -> Result<u128> {
        if d.is_empty() { Ok(0) } else { d.parse::<u128>().map_err(|_| bad("number too large")) }
    };
    let scale = 10u128.pow(frac_part.len() as u32);
    let scaled = digits(int_part)?
        .checked_mul(scale)
        .and_then(|v| v.checked_add(digits(frac_part).ok()?))
        .and_then(|v| v.checked_mul(multiplier))
        .ok_or_else(|| bad("number too large"))?;
    let bytes = u64::try_from(scaled / scale).map_err(|_| bad("number too large"))?;
    if bytes == 0 {
        return Err(bad("must be more than zero bytes"));
    }
    Ok(MemoryLimit::Bytes(bytes))
}

/// Formats bytes for people: `1.50 GiB`, `800.0 MiB`.
pub fn format_bytes(bytes: u64) -> String {
    if bytes >= GIB {
        format!("{:.2} GiB", bytes as f64 / GIB as f64)
    } else if bytes >= MIB {
        format!("{:.1} MiB", bytes as f64 / MIB as f64)
    } else {
        format!("{bytes} B")
    }
}

/// `usable_memory` for an open device.
pub fn probe(gpu: &Gpu) -> MemoryProbe {
    usable_memory(&gpu.info, Some(&gpu.device))
}

/// How much memory the node may use on this adapter.
///
/// - CPU adapters (lavapipe/llvmpipe): the OS's available memory minus a reserve.
/// - Apple (Metal) unified memory: 75% of system memory, which is what Metal's
///   `recommendedMaxWorkingSetSize` reports on Apple silicon.
/// - Vulkan GPUs (with `device`): the sum of the physical device's DEVICE_LOCAL heaps
///   minus a reserve; for integrated GPUs, at most the system's available memory too.
/// - Anything else (DX12, GL, no device): an estimate, with a warning.
pub fn usable_memory(info: &wgpu::AdapterInfo, device: Option<&wgpu::Device>) -> MemoryProbe {
    let system = system_memory();
    if info.device_type == wgpu::DeviceType::Cpu
        && let Some(sys) = system
    {
        return MemoryProbe { bytes: sys.available.saturating_sub(reserve(sys.total)), source: "system-available" };
    }
    // Unified memory: the GPU's working set shares RAM with everything else.
    if info.backend == wgpu::Backend::Metal
        && let Some(sys) = system
    {
        return MemoryProbe { bytes: sys.total / 4 * 3, source: "unified" };
    }
    if let Some(heaps) = device.and_then(vulkan_device_local_heaps) {
        let local = heaps.saturating_sub(reserve(heaps));
        let bytes = match (info.device_type, system) {
            // An integrated GPU's "device-local" heap is system RAM.
            (wgpu::DeviceType::IntegratedGpu, Some(sys)) => local.min(sys.available.saturating_sub(reserve(sys.total))),
            _ => local,
        };
        return MemoryProbe { bytes, source: "vulkan-heaps" };
    }
    let bytes = system.map_or(4 * GIB, |s| s.total / 2);
    tracing::warn!(adapter = %info.name, backend = ?info.backend, bytes,
        "cannot read this adapter's memory size; estimating {} (set it with --memory)", format_bytes(bytes));
    MemoryProbe { bytes, source: "estimate" }
}

/// Kept free for the driver, the OS and other programs: 10% of `total`, at least 512 MiB.
fn reserve(total: u64) -> u64 {
    (total / 10).max(512 * MIB)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SystemMemory {
    total: u64,
    available: u64,
}

#[cfg(target_os = "linux")]
fn system_memory() -> Option<SystemMemory> {
    parse_meminfo(&std::fs::read_to_string("/proc/meminfo").ok()?)
}

#[cfg(target_os = "macos")]
fn system_memory() -> Option<SystemMemory> {
    let out = std::process::Command::new("sysctl").args(["-n", "hw.memsize"]).output().ok()?;
    let total: u64 = String::from_utf8(out.stdout).ok()?.trim().parse().ok()?;
    // macOS has no cheap "available" figure without host_statistics; half is a safe floor.
    Some(SystemMemory { total, available: total / 2 })
}

#[cfg(not(any(target_os = "linux", target_os = "macos")))]
fn system_memory() -> Option<SystemMemory> {
    None
}

/// `MemTotal` and `MemAvailable` of a /proc/meminfo text (values in kB).
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
fn parse_meminfo(text: &str) -> Option<SystemMemory> {
    let field = |name: &str| -> Option<u64> {
        let line = text.lines().find(|l| l.starts_with(name) && l[name.len()..].starts_with(':'))?;
        let kb: u64 = line[name.len() + 1..].trim().trim_end_matches("kB").trim().parse().ok()?;
        kb.checked_mul(1024)
    };
    Some(SystemMemory { total: field("MemTotal")?, available: field("MemAvailable")? })
}

/// `VK_MEMORY_HEAP_DEVICE_LOCAL_BIT`, fixed by the Vulkan specification. Used as a raw bit
/// so that this crate needs no `ash` dependency of its own to match wgpu-hal's.
#[cfg_attr(not(any(windows, target_os = "linux", target_os = "android", target_os = "freebsd")), allow(dead_code))]
const VK_MEMORY_HEAP_DEVICE_LOCAL_BIT: u32 = 0x1;

/// Sum of the sizes of heaps flagged device-local, from (size, flags) pairs.
#[cfg_attr(not(any(windows, target_os = "linux", target_os = "android", target_os = "freebsd")), allow(dead_code))]
fn device_local_bytes(heaps: impl IntoIterator<Item = (u64, u32)>) -> Option<u64> {
    let sum: u64 =
        heaps.into_iter().filter(|(_, flags)| flags & VK_MEMORY_HEAP_DEVICE_LOCAL_BIT != 0).map(|(size, _)| size).sum();
    (sum > 0).then_some(sum)
}

/// The device-local heaps of a Vulkan device, read through wgpu-hal's ash handles.
#[cfg(any(windows, target_os = "linux", target_os = "android", target_os = "freebsd"))]
fn vulkan_device_local_heaps(device: &wgpu::Device) -> Option<u64> {
    // SAFETY: the hal device is only borrowed for this call and not used to create or
    // destroy anything; vkGetPhysicalDeviceMemoryProperties only reads properties.
    unsafe {
        let hal = device.as_hal::<wgpu::hal::api::Vulkan>()?;
        let props =
            hal.shared_instance().raw_instance().get_physical_device_memory_properties(hal.raw_physical_device());
        let count = (props.memory_heap_count as usize).min(props.memory_heaps.len());
        device_local_bytes(props.memory_heaps[..count].iter().map(|h| (h.size, h.flags.as_raw())))
    }
}

#[cfg(not(any(windows, target_os = "linux", target_os = "android", target_os = "freebsd")))]
fn vulkan_device_local_heaps(_device: &wgpu::Device) -> Option<u64> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sizes_with_units() {
        let cases: &[(&str, u64)] = &[
            ("12GiB", 12 << 30),
            ("800MB", 800_000_000),
            ("1.5GB", 1_500_000_000),
            ("1.5gib", 3 << 29),
            ("0.5 TiB", 1 << 39),
            ("4096", 4096),
            ("4096b", 4096),
            ("64KiB", 65536),
            ("2kb", 2000),
            (" 3 GB ", 3_000_000_000),
            (".5GB", 500_000_000),
        ];
        for &(text, bytes) in cases {
            assert_eq!(parse_size(text).unwrap(), MemoryLimit::Bytes(bytes), "{text}");
        }
        assert_eq!(parse_size("auto").unwrap(), MemoryLimit::Auto);
        assert_eq!(parse_size("AUTO").unwrap(), MemoryLimit::Auto);
        assert_eq!("8GiB".parse::<MemoryLimit>().unwrap(), MemoryLimit::Bytes(8 << 30));
    }

    #[test]
    fn refuses_bad_sizes_with_a_reason() {
        let cases: &[(&str, &str)] = &[
            ("", "expected a number"),
            ("GB", "expected a number"),
            ("-1GB", "negative"),
            ("12G", "ambiguous unit `G`: write GB (powers of 1000) or GiB"),
            ("12 m", "ambiguous unit"),
            ("12 parsecs", "unknown unit `parsecs`"),
            ("1.2.3GB", "expected a number"),
            (".", "expected a number"),
            ("0GB", "more than zero"),
            ("0.0000000001B", "more than zero"),
            ("99999999999999999999TiB", "too large"),
            ("20000000TiB", "too large"),
        ];
        for &(text, why) in cases {
            let e = parse_size(text).unwrap_err().to_string();
            assert!(e.contains(why), "`{text}`: error `{e}` should mention `{why}`");
            assert!(e.contains("examples"), "`{text}`: error `{e}` should show examples");
        }
    }

    #[test]
    fn explicit_limit_wins_over_the_probe() {
        let probe = || MemoryProbe { bytes: 1, source: "vulkan-heaps" };
        assert_eq!(MemoryLimit::Bytes(5).resolve(probe), MemoryProbe { bytes: 5, source: "flag" });
        assert_eq!(MemoryLimit::Auto.resolve(probe).source, "vulkan-heaps");
    }

    #[test]
    fn reads_meminfo() {
        let text =
            "MemTotal:       32768000 kB\nMemFree:         1000 kB\nMemAvailableX: 1 kB\nMemAvailable:   16384000 kB\n";
        assert_eq!(parse_meminfo(text), Some(SystemMemory { total: 32768000 * 1024, available: 16384000 * 1024 }));
        assert_eq!(parse_meminfo("MemTotal: 5 kB\n"), None);
    }

    #[test]
    fn sums_device_local_heaps_only() {
        // A discrete GPU without resizable BAR: VRAM, host memory, and the 256 MiB BAR window.
        let heaps = [(7936 * MIB, 1), (32 * GIB, 0), (256 * MIB, 1)];
        assert_eq!(device_local_bytes(heaps), Some(8 * GIB));
        assert_eq!(device_local_bytes([(GIB, 0)]), None);
    }

    #[test]
    fn reserve_is_ten_percent_but_at_least_512_mib() {
        assert_eq!(reserve(100 * GIB), 10 * GIB);
        assert_eq!(reserve(GIB), 512 * MIB);
    }

    #[test]
    fn cpu_adapter_uses_system_memory() {
        let info = wgpu::AdapterInfo::new(wgpu::DeviceType::Cpu, wgpu::Backend::Vulkan);
        let p = usable_memory(&info, None);
        if cfg!(target_os = "linux") {
            assert_eq!(p.source, "system-available");
            let sys = system_memory().unwrap();
            assert!(p.bytes <= sys.total, "{p:?} vs {sys:?}");
        } else {
            assert!(p.bytes > 0);
        }
    }
}
