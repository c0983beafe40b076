//! Adapter choice and device creation.

use std::sync::{Arc, Mutex};

use wgpu::util::DeviceExt;

use crate::{Error, Result};

/// How to pick and open the GPU.
#[derive(Debug, Clone, Default)]
pub struct GpuConfig {
    /// Substring of the adapter name to use (case-insensitive); falls back to the
    /// `WGPU_ADAPTER_NAME` environment variable, then to the best adapter found.
    pub adapter: Option<String>,
    /// Q8_0 matrix products through 4x8-bit integer dot products (`dot4I8Packed`), x
    /// quantised per block of 32 values to two bytes a value, instead of float
    /// multiply-adds: falls back to the `STRATA_INT8_DOT` environment variable (`on`/`off`),
    /// then off. Off by default because it is measured only on lavapipe, which lowers the
    /// instruction to byte extracts and runs the path slower than float products (README,
    /// "Integer dot products").
    pub int8_dot: Option<bool>,
    /// Every matrix product through cooperative matrices (`mm_coop`: tensor cores, Apple's
    /// simdgroup matrices), where the adapter offers wgpu's experimental
    /// `EXPERIMENTAL_COOPERATIVE_MATRIX` with square f16 x f16 -> f32 matrices (8 or 16) and
    /// a fixed subgroup size: falls back to the `STRATA_COOP_MATRIX` environment variable
    /// (`on`/`off`), then off. Off by default until measured on a GPU. Weights and x travel
    /// as two f16 each (about 22 bits), so its sums differ from the float kernels' in the
    /// last bits, but never with what shares a step (README, "Cooperative matrices").
    pub coop_matrix: Option<bool>,
}

/// What a device is, in words: for logs, reports and node identities (callers outside
/// this crate never format wgpu types themselves).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// The adapter's name, e.g. `llvmpipe (LLVM 19.1.7, 256 bits)`, with ` [int8 dot]`
    /// after it where Q8_0 products use integer dot products.
    pub name: String,
    /// The graphics API, e.g. `Vulkan`.
    pub backend: String,
    /// Which physical device computes, across processes: this machine's identity plus
    /// the GPU's PCI bus id (or vendor, device and name where the bus is unknown); every
    /// CPU adapter of one machine is one device. Stages with equal keys share the same
    /// silicon, so a pipeline gains nothing by overlapping their steps.
    pub key: String,
}

/// An open device with the adapter's full limits.
pub struct Gpu {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub info: wgpu::AdapterInfo,
    pub limits: wgpu::Limits,
    pub features: wgpu::Features,
    /// Q8_0 matrix products go through integer dot products ([`GpuConfig::int8_dot`]).
    pub int8_dot: bool,
    /// Matrix products go through cooperative matrices of this size ([`GpuConfig::coop_matrix`]).
    pub coop_matrix: Option<u32>,
    /// Decode steps split each row's keys over workgroups in `attention.wgsl` (the GPU
    /// kernel): `STRATA_SPLIT_ATTENTION` (`on`/`off`), on unless set off, so that a first
    /// GPU run can measure both. The bits are the same either way.
    pub split_attention: bool,
    /// The first GPU error no error scope caught since the last [`Gpu::check`]. wgpu's
    /// default handler panics; a node must instead fail the one request and keep serving.
    uncaptured: Arc<Mutex<Option<String>>>,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu").field("adapter", &self.info.name).field("backend", &self.info.backend).finish()
    }
}

/// This machine, as stable across processes as the system allows: systemd's machine id,
/// else the host name. Where neither is known, this process alone: two such nodes then
/// count as two devices, which at worst keeps the old one-step-per-stage pipelining.
fn machine_identity() -> String {
    ["/etc/machine-id", "/var/lib/dbus/machine-id", "/proc/sys/kernel/hostname"]
        .iter()
        .find_map(|p| std::fs::read_to_string(p).ok().map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()))
        .or_else(|| std::env::var("HOSTNAME").ok().filter(|s| !s.is_empty()))
        .unwrap_or_else(|| {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            format!("process-{}-{}", std::process::id(), now.as_nanos())
        })
}

/// A switch's value as the command line and the environment spell it: `on`/`true`/`1` or
/// `off`/`false`/`0`, any case; `None` for anything else.
pub fn parse_on_off(s: &str) -> Option<bool> {
    match s.trim().to_ascii_lowercase().as_str() {
        "on" | "true" | "1" => Some(true),
        "off" | "false" | "0" => Some(false),
        _ => None,
    }
}

/// The switch in environment variable `name` (unset or empty: `default`).
fn switch_from_env(name: &str, default: bool) -> Result<bool> {
    match std::env::var(name) {
        Err(_) => Ok(default),
        Ok(v) if v.trim().is_empty() => Ok(default),
        Ok(v) => parse_on_off(&v).ok_or_else(|| Error::Device(format!("{name}={v}: expected `on` or `off`"))),
    }
}

/// The size of the square cooperative matrices `mm_coop` can use on `adapter` (f16
/// products summed in f32; 16 where offered, else 8), or why there are none.
fn coop_matrix_size(adapter: &wgpu::Adapter) -> Result<u32> {
    let info = adapter.get_info();
    let missing = |what: &str| Err(Error::Device(format!("--coop-matrix: cooperative matrices: {} {what}", info.name)));
    let features = adapter.features();
    if !features.contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX) {
        return missing("offers none (wgpu's EXPERIMENTAL_COOPERATIVE_MATRIX; Vulkan's VK_KHR_cooperative_matrix)");
    }
    if !features.contains(wgpu::Features::SHADER_F16) {
        return missing("has no f16 in shaders");
    }
    if !features.contains(wgpu::Features::SUBGROUP) || info.subgroup_min_size != info.subgroup_max_size {
        return missing("has no fixed subgroup size (a workgroup of mm_coop is one subgroup)");
    }
    // Mesa 26's lavapipe at 128-bit vectors (subgroups of 4) lists 8x8 matrices, then
    // refuses the feature when the device is created.
    if info.subgroup_min_size < 8 {
        return missing(&format!(
            "has subgroups of {} lanes (cooperative matrices want 8 or more)",
            info.subgroup_min_size
        ));
    }
    use wgpu::CooperativeScalarType as T;
    let props = adapter.cooperative_matrix_properties();
    let square = |m: u32| {
        props
            .iter()
            .any(|p| p.m_size == m && p.n_size == m && p.k_size == m && p.ab_type == T::F16 && p.cr_type == T::F32)
    };
    match [16, 8].into_iter().find(|&m| square(m)) {
        Some(m) => Ok(m),
        None => missing(&format!("offers no square f16 x f16 -> f32 configuration of 8 or 16 (it offers {props:?})")),
    }
}

fn adapter_rank(info: &wgpu::AdapterInfo) -> u32 {
    match info.device_type {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Other => 3,
        wgpu::DeviceType::Cpu => 4,
    }
}

impl Gpu {
    pub fn new(config: &GpuConfig) -> Result<Gpu> {
        pollster::block_on(Self::open(config))
    }

    async fn open(config: &GpuConfig) -> Result<Gpu> {
        let mut desc = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
        desc.backends = wgpu::Backends::from_env().unwrap_or(wgpu::Backends::PRIMARY);
        let instance = wgpu::Instance::new(desc);
        let wanted =
            config.adapter.clone().or_else(|| std::env::var("WGPU_ADAPTER_NAME").ok()).map(|s| s.to_lowercase());
        let mut adapters = instance.enumerate_adapters(wgpu::Backends::all()).await;
        adapters.retain(|a| a.get_downlevel_capabilities().flags.contains(wgpu::DownlevelFlags::COMPUTE_SHADERS));
        let names: Vec<String> = adapters.iter().map(|a| a.get_info().name).collect();
        let adapter = match &wanted {
            Some(w) => adapters.into_iter().find(|a| a.get_info().name.to_lowercase().contains(w)).ok_or_else(|| {
                Error::NoAdapter(format!(" named like `{w}` (found: {})", if names.is_empty() { "none".into() } else { names.join(", ") }))
            })?,
            None => adapters.into_iter().min_by_key(|a| adapter_rank(&a.get_info())).ok_or_else(|| {
                Error::NoAdapter(": install a Vulkan driver (e.g. `apt-get install mesa-vulkan-drivers libvulkan1` for the CPU driver lavapipe)".into())
            })?,
        };
        let info = adapter.get_info();
        let limits = adapter.limits();
        let int8_dot = match config.int8_dot {
            Some(on) => on,
            None => switch_from_env("STRATA_INT8_DOT", false)?,
        };
        if int8_dot
            && !instance.wgsl_language_features().contains(wgpu::WgslLanguageFeatures::Packed4x8IntegerDotProduct)
        {
            return Err(Error::Device(format!(
                "--int8-dot: {} offers no packed 4x8-bit integer dot products in WGSL",
                info.name
            )));
        }
        let coop_matrix = match config.coop_matrix {
            Some(on) => on,
            None => switch_from_env("STRATA_COOP_MATRIX", false)?,
        }
        .then(|| coop_matrix_size(&adapter))
        .transpose()?;
        if int8_dot && coop_matrix.is_some() {
            return Err(Error::Device(
                "--int8-dot and --coop-matrix: integer dot products and cooperative matrices are two paths for the same products: turn one off"
                    .into(),
            ));
        }
        let optional = wgpu::Features::SHADER_F16 | wgpu::Features::SUBGROUP | wgpu::Features::TIMESTAMP_QUERY;
        let mut features = adapter.features() & optional;
        if coop_matrix.is_some() {
            features |= wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX;
        }
        let desc = wgpu::DeviceDescriptor {
            label: Some("strata"),
            required_features: features,
            required_limits: limits.clone(),
            memory_hints: wgpu::MemoryHints::Performance,
            // SAFETY: wgpu gates its experimental features behind this token. The one
            // requested, cooperative matrices, is used only by `mm_coop`, whose loads
            // and stores stay within workgroup arrays it declares.
            experimental_features: if coop_matrix.is_some() {
                unsafe { wgpu::ExperimentalFeatures::enabled() }
            } else {
                wgpu::ExperimentalFeatures::disabled()
            },
            ..Default::default()
        };
        // A driver may list cooperative-matrix configurations and then refuse the feature
        // (Mesa 26's lavapipe at 128-bit vectors), which wgpu reports by panicking: that
        // is an error of this device, not of the process.
        let (device, queue) = if coop_matrix.is_some() {
            let request = std::panic::AssertUnwindSafe(|| pollster::block_on(adapter.request_device(&desc)));
            std::panic::catch_unwind(request).map_err(|panic| {
                let why = panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied());
                Error::Device(format!(
                    "cooperative matrices: {} lists them but its driver refused to enable them ({})",
                    info.name,
                    why.unwrap_or("no reason given")
                ))
            })?
        } else {
            adapter.request_device(&desc).await
        }
        .map_err(|e| Error::Device(e.to_string()))?;
        tracing::info!(adapter = %info.name, backend = ?info.backend, kind = ?info.device_type,
            max_binding = limits.max_storage_buffer_binding_size, int8_dot, coop_matrix = ?coop_matrix, "opened GPU");
        let uncaptured = Arc::new(Mutex::new(None));
        let sink = uncaptured.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            tracing::error!(error = %e, "GPU error");
            sink.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert_with(|| e.to_string());
        }));
        let split_attention = switch_from_env("STRATA_SPLIT_ATTENTION", true)?;
        Ok(Gpu { device, queue, info, limits, features, int8_dot, coop_matrix, split_attention, uncaptured })
    }

    /// The GPU error raised since the last check outside any error scope, if any, as an
    /// error of `context`; clears it.
    pub fn check(&self, context: &str) -> Result<()> {
        match self.uncaptured.lock().unwrap_or_else(|p| p.into_inner()).take() {
            Some(message) => Err(Error::Gpu { context: context.to_owned(), message }),
            None => Ok(()),
        }
    }

    /// Runs `f` with out-of-memory and validation errors of every GPU call in it caught,
    /// and returns the first as an error of `context` (e.g. allocating a shard the device
    /// cannot hold).
    pub fn scoped<T>(&self, context: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let memory = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let validation = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let out = f();
        let errors = [pollster::block_on(validation.pop()), pollster::block_on(memory.pop())];
        if let Some(e) = errors.into_iter().flatten().next() {
            return Err(Error::Gpu { context: context.to_owned(), message: e.to_string() });
        }
        out
    }

    /// The subgroup size of a CPU adapter (lavapipe) whose subgroups are a fixed 4 or 8
    /// SIMD lanes of one thread: kernels written for that shape (lanes sharing values by
    /// subgroup operations, no workgroup memory) run much faster there. `None` elsewhere.
    pub fn cpu_subgroup(&self) -> Option<u32> {
        let (min, max) = (self.info.subgroup_min_size, self.info.subgroup_max_size);
        let fixed = self.features.contains(wgpu::Features::SUBGROUP) && min == max && matches!(min, 4 | 8);
        (self.info.device_type == wgpu::DeviceType::Cpu && fixed).then_some(min)
    }

    /// The device in words; a stage computing Q8_0 products with integer dot products says
    /// so after the adapter's name, so that `strata nodes`, `/v1/cluster` and bench reports
    /// show which path produced their figures.
    pub fn describe(&self) -> DeviceInfo {
        let name = match (self.int8_dot, self.coop_matrix) {
            (true, _) => format!("{} [int8 dot]", self.info.name),
            (false, Some(m)) => format!("{} [coop matrix {m}x{m}]", self.info.name),
            (false, None) => self.info.name.clone(),
        };
        DeviceInfo { name, backend: format!("{:?}", self.info.backend), key: self.device_key() }
    }

    fn device_key(&self) -> String {
        let host = machine_identity();
        let info = &self.info;
        if info.device_type == wgpu::DeviceType::Cpu {
            format!("{host}/cpu")
        } else if !info.device_pci_bus_id.is_empty() {
            format!("{host}/pci:{}", info.device_pci_bus_id)
        } else {
            format!("{host}/{:04x}:{:04x}/{}", info.vendor, info.device, info.name)
        }
    }

    /// The largest storage binding, rounded down to a 256-byte multiple so that
    /// bindings split at this size stay offset-aligned.
    pub fn max_binding(&self) -> u64 {
        let m = self.limits.max_storage_buffer_binding_size.min(self.limits.max_buffer_size);
        m / 256 * 256
    }

    /// A storage buffer holding `data` (also a copy source, so tests can read it back).
    pub fn storage_init(&self, label: &str, data: &[u8]) -> wgpu::Buffer {
        // Zero-sized buffers cannot be bound; keep at least one word.
        let padded;
        let contents = if data.len() < 4 || !data.len().is_multiple_of(4) {
            padded = {
                let mut v = data.to_vec();
                v.resize(data.len().max(4).div_ceil(4) * 4, 0);
                v
            };
            &padded[..]
        } else {
            data
        };
        self.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some(label),
            contents,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::COPY_SRC,
        })
    }

    /// An uninitialised (zeroed) storage buffer of `size` bytes. On CPU adapters it may also
    /// be bound as a uniform buffer: the matrix kernels read their input rows so there
    /// ([`crate::ops::matmul::MatmulPlan::uniform_x`]).
    pub fn storage(&self, label: &str, size: u64) -> wgpu::Buffer {
        let mut usage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::COPY_SRC;
        if self.info.device_type == wgpu::DeviceType::Cpu {
            usage |= wgpu::BufferUsages::UNIFORM;
        }
        self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: size.max(4).div_ceil(4) * 4,
            usage,
            mapped_at_creation: false,
        })
    }

    /// A uniform buffer holding `value`, writable later with `queue.write_buffer`.
    pub fn uniform<T: bytemuck::Pod>(&self, label: &str, value: &T) -> wgpu::Buffer {
        self.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some(label),
            contents: bytemuck::bytes_of(value),
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
        })
    }

    /// Copies `size` bytes at `offset` of `buffer` back to the CPU (blocking).
    pub fn read_bytes(&self, buffer: &wgpu::Buffer, offset: u64, size: u64) -> Result<Vec<u8>> {
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("readback"),
            size,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut enc = self.device.create_command_encoder(&Default::default());
        enc.copy_buffer_to_buffer(buffer, offset, &staging, 0, size);
        self.queue.submit([enc.finish()]);
        self.map_and_read(&staging, size)
    }

    /// Waits for submitted work, maps the first `size` bytes of a MAP_READ buffer and
    /// copies them out.
    pub fn map_and_read(&self, staging: &wgpu::Buffer, size: u64) -> Result<Vec<u8>> {
        let slice = staging.slice(..size);
        let (tx, rx) = std::sync::mpsc::channel();
        slice.map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::Gpu { context: "poll".into(), message: e.to_string() })?;
        rx.recv()
            .map_err(|e| Error::Gpu { context: "map".into(), message: e.to_string() })?
            .map_err(|e| Error::Gpu { context: "map".into(), message: e.to_string() })?;
        let bytes = slice
            .get_mapped_range()
            .map_err(|e| Error::Gpu { context: "map".into(), message: e.to_string() })?
            .to_vec();
        staging.unmap();
        Ok(bytes)
    }

    pub fn read_f32(&self, buffer: &wgpu::Buffer, count: usize) -> Result<Vec<f32>> {
        let b = self.read_bytes(buffer, 0, (count * 4) as u64)?;
        Ok(bytemuck::pod_collect_to_vec(&b))
    }

    pub fn read_u32(&self, buffer: &wgpu::Buffer, count: usize) -> Result<Vec<u32>> {
        let b = self.read_bytes(buffer, 0, (count * 4) as u64)?;
        Ok(bytemuck::pod_collect_to_vec(&b))
    }
}
