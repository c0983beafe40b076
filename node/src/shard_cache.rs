//! The shard cache: model files assembled on a node from tensor bytes the coordinator
//! streams to it, so that a node without the model file can still load its layers.
//!
//! For a model of identity H (hex `h`) the cache holds:
//!
//! - `h.shard`: a sparse file of the whole model's length. The header and tensor index
//!   (bytes `0..header_len`) and every received tensor byte sit at their real offsets, so
//!   [`Gguf::open`] on it yields the same identity and `Stage::load` reads it like the
//!   original; tensors never received are holes (and are never read: a shard is loaded
//!   only once every tensor it needs is complete).
//! - `h.have`: the manifest, an append-only log of lines `tensor\tend`: the tensor's
//!   bytes `0..end` are written and were verified by their chunk checksums. The header is
//!   the tensor named "". The last line of a tensor wins; a torn or malformed line (a
//!   crash mid-append) is ignored, which only means those bytes are fetched again.
//!
//! Lines are appended only after the data they describe has been synced to disk (every
//! [`FLUSH_BYTES`] and when a transfer ends, however it ends), so the manifest never
//! claims bytes a crash lost; an interrupted transfer resumes from the last record.
//! The file is named `.shard`, not `.gguf`, so that a cache directory that is also a
//! `--model-dir` never offers a half-filled file as a model.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use strata_model::gguf::{Gguf, TensorInfo};

use crate::{Error, Result};

/// Verified bytes written between syncs of the data (and manifest appends).
pub const FLUSH_BYTES: u64 = 64 << 20;

/// The name under which the header and tensor index are streamed and recorded.
pub const HEADER: &str = "";

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let context = context.into();
    move |source| Error::Io { context, source }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Bytes `from..to` of a tensor's data that the node still needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MissingRange {
    pub tensor: String,
    pub from: u64,
    pub to: u64,
}

/// A directory of streamed shards.
#[derive(Debug, Clone)]
pub struct ShardCache {
    dir: PathBuf,
}

/// A model whose header the cache holds and has verified.
pub struct CachedModel {
    pub path: PathBuf,
    pub gguf: Gguf,
    /// Per tensor, the end of its verified prefix.
    have: HashMap<String, u64>,
}

impl CachedModel {
    /// What of `tensors` is not yet held, from where each one's verified prefix ends.
    pub fn missing(&self, tensors: &[&TensorInfo]) -> Vec<MissingRange> {
        tensors
            .iter()
            .filter_map(|t| {
                let from = self.have.get(&t.name).copied().unwrap_or(0);
                (from < t.size).then(|| MissingRange { tensor: t.name.clone(), from, to: t.size })
            })
            .collect()
    }
}

/// The manifest's records: the largest end seen per name.
fn read_manifest(path: &Path) -> Result<Option<HashMap<String, u64>>> {
    let text = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(format!("reading {}", path.display()))(e)),
    };
    let mut have = HashMap::new();
    // Only whole lines: a crash can leave the last one torn.
    let whole = text.iter().rposition(|&b| b == b'\n').map_or(&[][..], |i| &text[..i]);
    for line in whole.split(|&b| b == b'\n') {
        let Ok(line) = std::str::from_utf8(line) else { continue };
        let Some((name, end)) = line.split_once('\t') else { continue };
        let Ok(end) = end.parse::<u64>() else { continue };
        let e = have.entry(name.to_owned()).or_insert(0);
        *e = (*e).max(end);
    }
    Ok(Some(have))
}

impl ShardCache {
    /// A cache in `dir`, created if needed.
    pub fn new(dir: impl Into<PathBuf>) -> Result<ShardCache> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(io(format!("creating the shard cache {}", dir.display())))?;
        Ok(ShardCache { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn data_path(&self, id: &[u8]) -> PathBuf {
        self.dir.join(format!("{}.shard", hex(id)))
    }

    fn manifest_path(&self, id: &[u8]) -> PathBuf {
        self.dir.join(format!("{}.have", hex(id)))
    }

    /// The cached model `id`, if its header was received and the file still has that
    /// identity; `None` when the node must be sent the header first.
    pub fn open(&self, id: &[u8]) -> Result<Option<CachedModel>> {
        let Some(records) = read_manifest(&self.manifest_path(id))? else { return Ok(None) };
        let header_len = records.get(HEADER).copied().unwrap_or(0);
        if header_len == 0 {
            return Ok(None);
        }
        let path = self.data_path(id);
        let gguf = match Gguf::open(&path) {
            Ok(g) if g.identity() == id && g.header_len == header_len => g,
            Ok(_) => {
                tracing::warn!(path = %path.display(), "cached shard does not match its manifest; fetching it again");
                return Ok(None);
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cached shard unreadable; fetching it again");
                return Ok(None);
            }
        };
        // Records beyond a tensor's size (or of unknown tensors) cannot come from this
        // node's own writes; they are ignored and those tensors fetched again.
        let have = records
            .into_iter()
            .filter_map(|(name, end)| {
                let t = gguf.tensor(&name)?;
                (end <= t.size).then_some((name, end))
            })
            .collect();
        Ok(Some(CachedModel { path, gguf, have }))
    }

    /// A receiver of one stream of chunks.
    pub fn receiver(&self) -> Receiver {
        Receiver { cache: self.clone(), open: None }
    }
}

/// The file being written and what of it is verified.
struct OpenShard {
    id: Vec<u8>,
    file: File,
    manifest: File,
    /// Per tensor: absolute offset in the file and size.
    tensors: HashMap<String, (u64, u64)>,
    have: HashMap<String, u64>,
    /// Verified ends written to the file but not yet synced and recorded.
    pending: BTreeMap<String, u64>,
    pending_bytes: u64,
}

impl OpenShard {
    /// Syncs the data, then records it: the manifest never runs ahead of the disk.
    fn flush(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        self.file.sync_data().map_err(io("syncing the shard cache"))?;
        let mut lines = String::new();
        for (name, end) in std::mem::take(&mut self.pending) {
            lines.push_str(&format!("{name}\t{end}\n"));
        }
        self.manifest.write_all(lines.as_bytes()).map_err(io("appending to the shard manifest"))?;
        self.manifest.sync_data().map_err(io("syncing the shard manifest"))?;
        self.pending_bytes = 0;
        Ok(())
    }
}

/// Applies the chunks of one `PushTensors` stream to the cache. Call [`Receiver::finish`]
/// when the stream ends, however it ends: what was verified is then recorded.
pub struct Receiver {
    cache: ShardCache,
    open: Option<OpenShard>,
}

impl Receiver {
    /// Verifies and writes one chunk: `data` is bytes `offset..` of `tensor`'s data
    /// ([`HEADER`]: the header and tensor index, whole, at offset 0).
    pub fn apply(&mut self, id: &[u8], tensor: &str, offset: u64, data: &[u8], checksum: u64) -> Result<()> {
        if id.len() != 8 {
            return Err(Error::Transfer(format!("a model id of {} bytes (expected 8)", id.len())));
        }
        if let Some(o) = &self.open
            && o.id != id
        {
            return Err(Error::Transfer(format!("one transfer carries one model: {} after {}", hex(id), hex(&o.id))));
        }
        if strata_proto::checksum::checksum(data) != checksum {
            let what = if tensor == HEADER { "the header".to_owned() } else { format!("tensor `{tensor}`") };
            return Err(Error::Corrupt(format!(
                "the chunk of {what} at offset {offset} ({} bytes) fails its checksum",
                data.len()
            )));
        }
        if tensor == HEADER {
            return self.header(id, offset, data);
        }
        if self.open.is_none() {
            self.open = Some(self.reopen(id)?.ok_or_else(|| {
                Error::Transfer(format!("tensor `{tensor}` sent before the header of model {}", hex(id)))
            })?);
        }
        let o = self.open.as_mut().expect("opened above");
        let &(start, size) = o
            .tensors
            .get(tensor)
            .ok_or_else(|| Error::Transfer(format!("model {} has no tensor `{tensor}`", hex(id))))?;
        let have = o.have.get(tensor).copied().unwrap_or(0);
        if data.is_empty() {
            return Err(Error::Transfer(format!("an empty chunk of tensor `{tensor}`")));
        }
        if offset != have {
            return Err(Error::Transfer(format!(
                "a chunk of tensor `{tensor}` at offset {offset}, but the node holds its bytes up to {have}: chunks must continue where the held bytes end"
            )));
        }
        let end = offset.checked_add(data.len() as u64).filter(|&e| e <= size).ok_or_else(|| {
            Error::Transfer(format!(
                "a chunk of tensor `{tensor}` at offset {offset} of {} bytes runs past its {size} bytes",
                data.len()
            ))
        })?;
        o.file
            .seek(SeekFrom::Start(start + offset))
            .and_then(|_| o.file.write_all(data))
            .map_err(io("writing to the shard cache"))?;
        o.have.insert(tensor.to_owned(), end);
        o.pending.insert(tensor.to_owned(), end);
        o.pending_bytes += data.len() as u64;
        if o.pending_bytes >= FLUSH_BYTES {
            o.flush()?;
        }
        Ok(())
    }

    /// Records what was verified. Safe to call more than once.
    pub fn finish(&mut self) -> Result<()> {
        match &mut self.open {
            Some(o) => o.flush(),
            None => Ok(()),
        }
    }

    /// Opens the cached file of `id` for writing, if its header is held.
    fn reopen(&self, id: &[u8]) -> Result<Option<OpenShard>> {
        let Some(model) = self.cache.open(id)? else { return Ok(None) };
        let tensors =
            model.gguf.tensors.iter().map(|t| (t.name.clone(), (model.gguf.data_start + t.offset, t.size))).collect();
        let file = OpenOptions::new()
            .write(true)
            .open(&model.path)
            .map_err(io(format!("opening {}", model.path.display())))?;
        let mpath = self.cache.manifest_path(id);
        let manifest =
            OpenOptions::new().append(true).open(&mpath).map_err(io(format!("opening {}", mpath.display())))?;
        Ok(Some(OpenShard {
            id: id.to_vec(),
            file,
            manifest,
            tensors,
            have: model.have,
            pending: BTreeMap::new(),
            pending_bytes: 0,
        }))
    }

    /// Starts (or, if the cache already holds this header, keeps) the model's file.
    fn header(&mut self, id: &[u8], offset: u64, data: &[u8]) -> Result<()> {
        if offset != 0 {
            return Err(Error::Transfer(format!("the header is sent whole, at offset 0, not {offset}")));
        }
        let index = Gguf::header_index(data)
            .map_err(|e| Error::Transfer(format!("the streamed header is not a GGUF header: {e}")))?;
        if index.identity != id {
            return Err(Error::Corrupt(format!(
                "the streamed header has identity {}, not {}",
                hex(&index.identity),
                hex(id)
            )));
        }
        if self.open.is_some() {
            return Ok(());
        }
        if let Some(o) = self.reopen(id)? {
            self.open = Some(o);
            return Ok(());
        }
        let (path, mpath) = (self.cache.data_path(id), self.cache.manifest_path(id));
        // A peer may send every tensor of the model it declared, up to its whole length:
        // that must fit on this disk, or nothing is started.
        check_room(index.file_len, free_bytes(&self.cache.dir), &self.cache.dir)?;
        // A fresh start: whatever an older manifest says is void.
        let _ = std::fs::remove_file(&mpath);
        let mut file = File::create(&path).map_err(io(format!("creating {}", path.display())))?;
        file.set_len(index.file_len).map_err(io(format!("sizing {} to {} bytes", path.display(), index.file_len)))?;
        file.write_all(data).and_then(|_| file.sync_data()).map_err(io(format!("writing {}", path.display())))?;
        let mut manifest = File::create(&mpath).map_err(io(format!("creating {}", mpath.display())))?;
        manifest
            .write_all(format!("{HEADER}\t{}\n", data.len()).as_bytes())
            .and_then(|_| manifest.sync_data())
            .map_err(io(format!("writing {}", mpath.display())))?;
        tracing::info!(model = %hex(id), bytes = index.file_len, path = %path.display(), "started a shard file");
        self.open = self.reopen(id)?;
        if self.open.is_none() {
            return Err(Error::Transfer(format!(
                "the shard file {} did not read back as model {}",
                path.display(),
                hex(id)
            )));
        }
        Ok(())
    }
}

/// Refuses a model file of `len` bytes when the cache's file system has less `free`
/// (unknown free space is not a refusal).
fn check_room(len: u64, free: Option<u64>, dir: &Path) -> Result<()> {
    match free {
        Some(free) if free < len => Err(Error::Transfer(format!(
            "the model is {len} bytes, but the shard cache's disk ({}) has {free} bytes free: \
             free some space or point --cache-dir elsewhere",
            dir.display()
        ))),
        _ => Ok(()),
    }
}

/// Bytes an unprivileged writer may still use on the file system holding `dir`.
#[cfg(unix)]
fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is a NUL-terminated path and `st` a buffer of the right type, which
    // statvfs fills completely when it returns 0.
    let st = unsafe {
        if libc::statvfs(c.as_ptr(), st.as_mut_ptr()) != 0 {
            return None;
        }
        st.assume_init()
    };
    #[allow(clippy::unnecessary_cast)] // the field types differ between platforms
    Some(st.f_bavail as u64 * st.f_frsize as u64)
}

#[cfg(not(unix))]
fn free_bytes(_dir: &Path) -> Option<u64> {
    None
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Err(e) = self.finish() {
            tracing::warn!(error = %e, "could not record received tensor bytes");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A declared model larger than the disk's free space is refused with both numbers;
    /// the real free space of a temporary directory is read.
    #[test]
    fn a_model_larger_than_the_free_disk_is_refused() {
        let dir = std::env::temp_dir();
        let err = check_room(1 << 40, Some(1 << 30), &dir).unwrap_err().to_string();
        assert!(err.contains("1099511627776 bytes") && err.contains("1073741824 bytes free"), "{err}");
        assert!(check_room(100, Some(100), &dir).is_ok());
        assert!(check_room(100, None, &dir).is_ok());
        let free = free_bytes(&dir);
        assert!(cfg!(not(unix)) || free.is_some_and(|f| f > 0), "{free:?}");
    }

    fn tiny() -> Gguf {
        Gguf::open(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/tiny-qwen3.gguf")).unwrap()
    }

    fn temp_cache(tag: &str) -> ShardCache {
        let dir = std::env::temp_dir().join(format!("strata-shard-cache-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        ShardCache::new(dir).unwrap()
    }

    fn push(r: &mut Receiver, g: &Gguf, tensor: &str, offset: u64, data: &[u8]) -> Result<()> {
        r.apply(&g.identity(), tensor, offset, data, strata_proto::checksum::checksum(data))
    }

    #[test]
    fn assembles_a_model_that_reads_back_identical() {
        let g = tiny();
        let cache = temp_cache("whole");
        assert!(cache.open(&g.identity()).unwrap().is_none());
        let mut r = cache.receiver();
        push(&mut r, &g, HEADER, 0, &g.bytes()[..g.header_len as usize]).unwrap();
        for t in &g.tensors {
            for (i, c) in g.tensor_data(t).chunks(1000).enumerate() {
                push(&mut r, &g, &t.name, i as u64 * 1000, c).unwrap();
            }
        }
        r.finish().unwrap();
        let m = cache.open(&g.identity()).unwrap().expect("cached");
        let all: Vec<&TensorInfo> = g.tensors.iter().collect();
        assert!(m.missing(&all).is_empty());
        for t in &g.tensors {
            assert_eq!(m.gguf.tensor_data(t), g.tensor_data(t), "{}", t.name);
        }
    }

    #[test]
    fn resumes_where_verified_bytes_end_and_refuses_bad_chunks() {
        let g = tiny();
        let cache = temp_cache("resume");
        let t = g.tensors.iter().max_by_key(|t| t.size).unwrap();
        let data = g.tensor_data(t);
        let half = data.len() as u64 / 2;
        {
            let mut r = cache.receiver();
            push(&mut r, &g, HEADER, 0, &g.bytes()[..g.header_len as usize]).unwrap();
            push(&mut r, &g, &t.name, 0, &data[..half as usize]).unwrap();
            // Dropped without finish: an interrupted stream still records what it verified.
        }
        let m = cache.open(&g.identity()).unwrap().unwrap();
        assert_eq!(m.missing(&[t]), vec![MissingRange { tensor: t.name.clone(), from: half, to: t.size }]);
        let mut r = cache.receiver();
        let rest = &data[half as usize..];
        let e = r.apply(&g.identity(), &t.name, half, rest, strata_proto::checksum::checksum(rest) ^ 1).unwrap_err();
        assert!(matches!(e, Error::Corrupt(_)) && e.to_string().contains(&format!("at offset {half}")), "{e}");
        let gap = push(&mut r, &g, &t.name, half + 32, &rest[32..]).unwrap_err();
        assert!(gap.to_string().contains("must continue"), "{gap}");
        let past = push(&mut r, &g, &t.name, half, &[rest, &[0u8; 4][..]].concat()).unwrap_err();
        assert!(past.to_string().contains("runs past"), "{past}");
        assert!(push(&mut r, &g, "no.such.tensor", 0, &[1]).unwrap_err().to_string().contains("no tensor"));
        push(&mut r, &g, &t.name, half, rest).unwrap();
        r.finish().unwrap();
        let m = cache.open(&g.identity()).unwrap().unwrap();
        assert!(m.missing(&[t]).is_empty());
        assert_eq!(m.gguf.tensor_data(t), data);
    }

    #[test]
    fn refuses_a_header_of_another_model_and_tensors_before_the_header() {
        let g = tiny();
        let cache = temp_cache("header");
        let t = &g.tensors[0];
        let mut r = cache.receiver();
        assert!(
            push(&mut r, &g, &t.name, 0, &g.tensor_data(t)[..8]).unwrap_err().to_string().contains("before the header")
        );
        let header = &g.bytes()[..g.header_len as usize];
        let e = r.apply(&[9; 8], HEADER, 0, header, strata_proto::checksum::checksum(header)).unwrap_err();
        assert!(e.to_string().contains("identity"), "{e}");
        assert!(cache.open(&g.identity()).unwrap().is_none());
    }
}
