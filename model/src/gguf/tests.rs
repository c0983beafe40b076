//! The GGUF reader and writer: round trips, the fixtures, and hostile input.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

use half::{bf16, f16};

use super::{Gguf, GgufWriter, MAX_NESTING, TensorData, Value as V, ValueType as VT};
use crate::quant::tests::Rng;
use crate::quant::{GgmlType, dequantize, quantize_q8_0};
use crate::{Error, Result};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/");

/// A path in the temp dir, removed on drop.
struct TempPath(PathBuf);

impl TempPath {
    fn new(tag: &str) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        TempPath(std::env::temp_dir().join(format!("strata-gguf-{}-{n}-{tag}.gguf", std::process::id())))
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Parsing `bytes` must fail, without a panic, with an error whose message contains `want`.
#[track_caller]
fn assert_refused(what: &str, bytes: Vec<u8>, want: &str) -> Error {
    match catch_unwind(|| Gguf::from_bytes(bytes)) {
        Err(_) => panic!("{what}: the reader panicked"),
        Ok(Ok(g)) => panic!("{what}: accepted ({g:?}), expected an error mentioning {want:?}"),
        Ok(Err(e)) => {
            let msg = e.to_string();
            assert!(msg.contains(want), "{what}: error {msg:?} does not mention {want:?}");
            e
        }
    }
}

#[track_caller]
fn assert_config_err(what: &str, r: Result<()>, want: &str) {
    let msg = r.expect_err(what).to_string();
    assert!(msg.contains(want), "{what}: error {msg:?} does not mention {want:?}");
}

fn f32_bytes(v: impl IntoIterator<Item = f32>) -> Vec<u8> {
    v.into_iter().flat_map(f32::to_le_bytes).collect()
}

fn f16_bytes(v: impl IntoIterator<Item = f32>) -> Vec<u8> {
    v.into_iter().flat_map(|x| f16::from_f32(x).to_le_bytes()).collect()
}

fn bf16_bytes(v: impl IntoIterator<Item = f32>) -> Vec<u8> {
    v.into_iter().flat_map(|x| bf16::from_f32(x).to_le_bytes()).collect()
}

/// `levels` arrays, each holding the next; the innermost holds one u8.
fn nested(levels: u32) -> V {
    (1..levels).fold(V::Array(VT::U8, vec![V::U8(7)]), |inner, _| V::Array(VT::Array, vec![inner]))
}

/// GGUF bytes built by hand, for what the writer will not produce.
struct Bytes(Vec<u8>);

impl Bytes {
    fn header(version: u32, n_tensors: u64, n_kv: u64) -> Self {
        Bytes(b"GGUF".to_vec()).u32(version).u64(n_tensors).u64(n_kv)
    }

    fn raw(mut self, b: &[u8]) -> Self {
        self.0.extend_from_slice(b);
        self
    }

    fn u8(self, v: u8) -> Self {
        self.raw(&[v])
    }

    fn u32(self, v: u32) -> Self {
        self.raw(&v.to_le_bytes())
    }

    fn u64(self, v: u64) -> Self {
        self.raw(&v.to_le_bytes())
    }

    fn str(self, s: &str) -> Self {
        self.u64(s.len() as u64).raw(s.as_bytes())
    }

    /// A metadata key and value type; the value comes next.
    fn kv(self, key: &str, ty: VT) -> Self {
        self.str(key).u32(ty as u32)
    }

    /// One entry of the tensor index.
    fn tensor(self, name: &str, dims: &[u64], ty_id: u32, offset: u64) -> Self {
        let b = self.str(name).u32(dims.len() as u32);
        dims.iter().fold(b, |b, &d| b.u64(d)).u32(ty_id).u64(offset)
    }

    fn pad(self, align: usize) -> Self {
        let n = self.0.len().next_multiple_of(align) - self.0.len();
        self.raw(&vec![0; n])
    }

    fn done(self) -> Vec<u8> {
        self.0
    }
}

/// A file with one tensor entry `t` and 64 bytes of data.
fn file_with_tensor(dims: &[u64], ty_id: u32, offset: u64) -> Vec<u8> {
    Bytes::header(3, 1, 0).tensor("t", dims, ty_id, offset).pad(32).raw(&[0; 64]).done()
}

/// A file whose only metadata is `general.alignment` of type `ty`, then the value bytes.
fn file_with_alignment(ty: VT, value: &[u8]) -> Vec<u8> {
    Bytes::header(3, 0, 1).kv("general.alignment", ty).raw(value).done()
}

/// Metadata holding every value type, arrays of each, empty and nested arrays.
fn every_value() -> Vec<(String, V)> {
    let scalars = [
        V::U8(200),
        V::I8(-100),
        V::U16(60_000),
        V::I16(-30_000),
        V::U32(4_000_000_000),
        V::I32(-2_000_000_000),
        V::F32(-1.5e-3),
        V::Bool(true),
        V::String("héllo, wörld".into()),
        V::U64(u64::MAX),
        V::I64(i64::MIN),
        V::F64(std::f64::consts::PI),
    ];
    let mut kv = Vec::new();
    for v in &scalars {
        let (name, ty) = (v.type_name(), v.value_type());
        kv.push((format!("test.scalar.{name}"), v.clone()));
        kv.push((format!("test.array.{name}"), V::Array(ty, vec![v.clone(), v.clone(), v.clone()])));
        kv.push((format!("test.empty.{name}"), V::Array(ty, vec![])));
    }
    let u32s = |v: &[u32]| V::Array(VT::U32, v.iter().map(|&x| V::U32(x)).collect());
    kv.extend([
        ("test.scalar.false".into(), V::Bool(false)),
        ("test.scalar.empty_string".into(), V::String(String::new())),
        ("test.array.bools".into(), V::Array(VT::Bool, vec![V::Bool(false), V::Bool(true)])),
        ("test.nested.u32".into(), V::Array(VT::Array, vec![u32s(&[1, 2]), u32s(&[]), u32s(&[3])])),
        (
            "test.nested.strings".into(),
            V::Array(VT::Array, vec![V::Array(VT::String, vec![V::String("a".into()), V::String(String::new())])]),
        ),
        ("test.nested.empty".into(), V::Array(VT::Array, vec![])),
        ("test.nested.deepest".into(), nested(MAX_NESTING)),
    ]);
    kv
}

/// A tensor to write; `None` data is a `TensorData::Zeros` tensor.
struct Sample {
    name: &'static str,
    ty: GgmlType,
    dims: Vec<u64>,
    data: Option<Vec<u8>>,
}

fn sample_tensors() -> Vec<Sample> {
    let ramp = |n: usize, step: f32| (0..n).map(move |i| (i as f32 - n as f32 / 2.0) * step);
    vec![
        Sample { name: "vec.f32", ty: GgmlType::F32, dims: vec![7], data: Some(f32_bytes(ramp(7, 0.5))) },
        Sample {
            name: "mat.q8_0",
            ty: GgmlType::Q8_0,
            dims: vec![64, 3],
            data: Some(quantize_q8_0(&ramp(192, 0.1).collect::<Vec<_>>())),
        },
        Sample { name: "cube.f16", ty: GgmlType::F16, dims: vec![4, 3, 2], data: Some(f16_bytes(ramp(24, 0.25))) },
        Sample { name: "zeros.q4_k", ty: GgmlType::Q4_K, dims: vec![256, 2], data: None },
        Sample {
            name: "hyper.bf16",
            ty: GgmlType::BF16,
            dims: vec![2, 3, 1, 2],
            data: Some(bf16_bytes(ramp(12, 1.0))),
        },
        Sample { name: "last.f32", ty: GgmlType::F32, dims: vec![3], data: Some(f32_bytes([1.0, -2.0, 3.0])) },
    ]
}

/// The round-trip file: `general.alignment` = 64, every value type, every sample tensor.
fn sample_writer() -> (GgufWriter, Vec<(String, V)>) {
    let mut metadata = vec![("general.alignment".to_owned(), V::U32(64))];
    metadata.extend(every_value());
    let mut w = GgufWriter::new();
    for (k, v) in &metadata {
        w.set(k.clone(), v.clone()).unwrap();
    }
    for t in sample_tensors() {
        let data = t.data.map_or(TensorData::Zeros, TensorData::Bytes);
        w.add_tensor(t.name, t.ty, t.dims, data).unwrap();
    }
    (w, metadata)
}

/// Checks a parsed round-trip file against what was written.
fn check_sample(g: &Gguf, metadata: &[(String, V)]) {
    assert_eq!(g.version, 3);
    assert_eq!(g.alignment, 64);
    assert_eq!(g.metadata, metadata);
    for (k, v) in metadata {
        assert_eq!(g.get(k), Some(v), "{k}");
    }
    assert!(g.data_start.is_multiple_of(64) && g.data_start >= g.header_len && g.data_start - g.header_len < 64);

    let samples = sample_tensors();
    assert_eq!(g.tensors.len(), samples.len());
    // llama.cpp's rule: each tensor starts where the previous one ends, padded.
    let mut next = 0;
    for (t, s) in g.tensors.iter().zip(&samples) {
        assert_eq!((t.name.as_str(), t.ty, &t.dims), (s.name, s.ty, &s.dims));
        assert_eq!(Some(t.size), s.ty.bytes_for(t.n_elements()), "{}", s.name);
        assert_eq!(t.offset, next, "{} is not where the previous tensor ends", s.name);
        assert_eq!(t.offset % 64, 0);
        assert_eq!(g.tensor(s.name), Some(t));
        match &s.data {
            Some(bytes) => assert_eq!(g.tensor_data(t), bytes.as_slice(), "{}", s.name),
            None => assert!(g.tensor_data(t).iter().all(|&b| b == 0), "{} is not zero", s.name),
        }
        next = (t.offset + t.size).next_multiple_of(64);
    }
    assert_eq!(g.bytes().len() as u64, g.data_start + next, "the file ends after the last tensor's padding");

    let cube = g.require_tensor("cube.f16").unwrap();
    assert_eq!((cube.row_len(), cube.n_rows(), cube.n_elements()), (4, 6, 24));
    let zeros = g.tensor("zeros.q4_k").unwrap();
    assert_eq!(dequantize(zeros.ty, g.tensor_data(zeros)).unwrap(), vec![0.0; 512]);
}

#[test]
fn round_trip_through_file_and_memory() {
    let (w, metadata) = sample_writer();
    let path = TempPath::new("round-trip");
    w.write(&path.0).unwrap();
    let on_disk = std::fs::read(&path.0).unwrap();
    assert_eq!(on_disk, w.to_bytes().unwrap(), "write and to_bytes agree");

    check_sample(&Gguf::open(&path.0).unwrap(), &metadata);
    check_sample(&Gguf::from_bytes(on_disk).unwrap(), &metadata);
}

#[test]
fn typed_getters_convert_and_name_the_key() {
    let g = Gguf::from_bytes(sample_writer().0.to_bytes().unwrap()).unwrap();
    assert_eq!(g.get_u64("test.scalar.u8").unwrap(), Some(200));
    assert_eq!(g.get_u64("test.scalar.u64").unwrap(), Some(u64::MAX));
    assert_eq!(g.get_f64("test.scalar.u64").unwrap(), Some(u64::MAX as f64));
    assert_eq!(g.get_f64("test.scalar.i32").unwrap(), Some(-2e9));
    assert_eq!(g.get_f64("test.scalar.f32").unwrap(), Some(f64::from(-1.5e-3f32)));
    assert_eq!(g.get_str("test.scalar.string").unwrap(), Some("héllo, wörld"));
    assert_eq!(g.get_bool("test.scalar.false").unwrap(), Some(false));
    assert_eq!(g.get_u64("no.such.key").unwrap(), None);
    assert_eq!(g.require("test.array.u8").unwrap().as_array().map(<[V]>::len), Some(3));

    let e = g.get_u64("test.scalar.i8").unwrap_err().to_string();
    assert!(e.contains("`test.scalar.i8` has type i8, expected unsigned integer"), "{e}");
    let e = g.require_str("test.scalar.u32").unwrap_err().to_string();
    assert!(e.contains("`test.scalar.u32` has type u32, expected string"), "{e}");
    assert!(matches!(g.require_u64("no.such.key"), Err(Error::MissingKey(k)) if k == "no.such.key"));
    assert!(matches!(g.require_tensor("no.such.tensor"), Err(Error::MissingTensor(_))));
    assert!(matches!(g.architecture(), Err(Error::MissingKey(_))));
}

#[test]
fn writer_replaces_a_key_in_place() {
    let mut w = GgufWriter::new();
    w.set("a", V::U8(1)).unwrap();
    w.set("b", V::U8(2)).unwrap();
    w.set("a", V::String("again".into())).unwrap();
    let g = Gguf::from_bytes(w.to_bytes().unwrap()).unwrap();
    assert_eq!(g.metadata, [("a".to_owned(), V::String("again".into())), ("b".to_owned(), V::U8(2))]);
    // No tensors: the data section starts, empty, at the default alignment.
    assert_eq!(g.alignment, 32);
    assert_eq!(g.bytes().len() as u64, g.data_start);
}

#[test]
fn writer_refuses_what_readers_would_refuse() {
    let w = GgufWriter::new;
    let zeros = || TensorData::Zeros;
    assert_config_err("alignment u64", w().set("general.alignment", V::U64(64)), "must be a u32");
    assert_config_err("alignment 48", w().set("general.alignment", V::U32(48)), "power of two");
    assert_config_err("alignment 2 MiB", w().set("general.alignment", V::U32(1 << 21)), "power of two");
    assert_config_err("empty key", w().set("", V::U8(0)), "key is empty");
    assert_config_err(
        "mixed array",
        w().set("a", V::Array(VT::U8, vec![V::U8(1), V::U16(2)])),
        "array of U8 holds a u16",
    );
    let deep_mixed = V::Array(VT::Array, vec![V::Array(VT::U32, vec![V::I32(1)])]);
    assert_config_err("mixed inner array", w().set("a", deep_mixed), "array of U32 holds a i32");
    assert_config_err("too deep", w().set("a", nested(MAX_NESTING + 1)), "nested deeper than 8");
    assert_config_err("0 dims", w().add_tensor("t", GgmlType::F32, vec![], zeros()), "0 dimensions");
    assert_config_err("5 dims", w().add_tensor("t", GgmlType::F32, vec![1; 5], zeros()), "5 dimensions");
    assert_config_err(
        "partial block",
        w().add_tensor("t", GgmlType::Q8_0, vec![33], zeros()),
        "not a whole number of Q8_0 blocks",
    );
    assert_config_err("overflow", w().add_tensor("t", GgmlType::F32, vec![1 << 32, 1 << 32], zeros()), "overflows");
    assert_config_err("huge dim", w().add_tensor("t", GgmlType::F32, vec![u64::MAX], zeros()), "too large");
    let short = TensorData::Bytes(vec![0; 15]);
    assert_config_err("short data", w().add_tensor("t", GgmlType::F32, vec![4], short), "15 bytes given, 16 expected");
    assert_config_err(
        "long name",
        w().add_tensor("x".repeat(64), GgmlType::F32, vec![4], zeros()),
        "llama.cpp allows 63",
    );

    let mut twice = w();
    twice.add_tensor("t", GgmlType::F32, vec![4], zeros()).unwrap();
    assert_config_err("duplicate tensor", twice.add_tensor("t", GgmlType::F32, vec![4], zeros()), "added twice");
}

#[cfg(unix)]
#[test]
fn zero_tensors_are_holes_in_the_file() {
    use std::os::unix::fs::MetadataExt;
    let mut w = GgufWriter::new();
    w.add_tensor("big", GgmlType::F32, vec![1024, 4096], TensorData::Zeros).unwrap();
    w.add_tensor("small", GgmlType::F32, vec![4], TensorData::Bytes(f32_bytes([1.0, 2.0, 3.0, 4.0]))).unwrap();
    let path = TempPath::new("sparse");
    w.write(&path.0).unwrap();
    let meta = std::fs::metadata(&path.0).unwrap();
    assert!(meta.len() > 16 << 20);
    assert!(meta.blocks() * 512 < 1 << 20, "16 MiB of zeros took {} bytes of disk", meta.blocks() * 512);

    let g = Gguf::open(&path.0).unwrap();
    assert!(g.tensor_data(g.tensor("big").unwrap()).iter().all(|&b| b == 0));
    assert_eq!(dequantize(GgmlType::F32, g.tensor_data(g.tensor("small").unwrap())).unwrap(), [1.0, 2.0, 3.0, 4.0]);
}

// The fixtures, written by llama.cpp's Python gguf package.

#[test]
fn fixtures_read_with_known_facts() {
    for (file, arch, n_tensors, n_kv) in [("tiny-qwen3.gguf", "qwen3", 69, 24), ("tiny-qwen35.gguf", "qwen35", 109, 31)]
    {
        let g = Gguf::open(format!("{FIXTURES}{file}")).unwrap();
        assert_eq!(g.architecture().unwrap(), arch, "{file}");
        assert_eq!((g.version, g.alignment), (3, 32), "{file}");
        assert_eq!((g.tensors.len(), g.metadata.len()), (n_tensors, n_kv), "{file}");
        assert_eq!(g.require_u64(&format!("{arch}.embedding_length")).unwrap(), 128, "{file}");
        let tokens = g.require("tokenizer.ggml.tokens").unwrap().as_array().unwrap();
        assert_eq!((tokens.len(), tokens[1].as_str()), (1024, Some("<|im_start|>")), "{file}");

        let embd = g.require_tensor("token_embd.weight").unwrap();
        assert_eq!((&embd.dims, embd.ty), (&vec![128, 1024], GgmlType::Q8_0), "{file}");
        assert_eq!(dequantize(embd.ty, g.tensor_data(embd)).unwrap().len(), 128 * 1024);

        let mut next = 0;
        for t in &g.tensors {
            assert_eq!(t.offset, next, "{file}: {} is not packed after the previous tensor", t.name);
            assert!(g.data_start + t.offset + t.size <= g.bytes().len() as u64, "{file}: {} runs past the end", t.name);
            next = (t.offset + t.size).next_multiple_of(g.alignment);
        }
        assert_eq!(g.data_start + next, g.bytes().len() as u64, "{file}: trailing bytes");
    }
}

/// Rewriting a fixture with the writer reproduces it byte for byte: the writer lays a
/// file out exactly as the llama.cpp ecosystem does.
#[test]
fn writer_reproduces_the_fixtures_byte_for_byte() {
    for file in ["tiny-qwen3.gguf", "tiny-qwen35.gguf"] {
        let original = std::fs::read(format!("{FIXTURES}{file}")).unwrap();
        let g = Gguf::from_bytes(original.clone()).unwrap();
        let mut w = GgufWriter::new();
        for (k, v) in &g.metadata {
            w.set(k.clone(), v.clone()).unwrap();
        }
        for t in &g.tensors {
            w.add_tensor(t.name.clone(), t.ty, t.dims.clone(), TensorData::Bytes(g.tensor_data(t).to_vec())).unwrap();
        }
        assert!(w.to_bytes().unwrap() == original, "{file} differs when rewritten");
    }
}

#[test]
fn reads_a_hand_written_version_2_file() {
    // v2 has the same layout as v3 (u64 counts and lengths); only the version differs.
    let file = |version| {
        Bytes::header(version, 1, 2)
            .kv("general.architecture", VT::String)
            .str("llama")
            .kv("n", VT::Array)
            .u32(VT::U16 as u32)
            .u64(2)
            .raw(&[1, 0, 2, 0])
            .tensor("w", &[4], GgmlType::F32.id(), 0)
            .pad(32)
            .raw(&f32_bytes([1.0, 2.0, 3.0, 4.0]))
            .done()
    };
    let v2 = Gguf::from_bytes(file(2)).unwrap();
    assert_eq!(v2.version, 2);
    assert_eq!(v2.architecture().unwrap(), "llama");
    assert_eq!(v2.get("n"), Some(&V::Array(VT::U16, vec![V::U16(1), V::U16(2)])));
    let w = v2.require_tensor("w").unwrap();
    assert_eq!(dequantize(w.ty, v2.tensor_data(w)).unwrap(), [1.0, 2.0, 3.0, 4.0]);

    let v3 = Gguf::from_bytes(file(3)).unwrap();
    assert_eq!((v3.metadata, v3.tensors), (v2.metadata, v2.tensors));
}

// Hostile input: every malformed file is an error that says what is wrong.

#[test]
fn hostile_headers_are_refused() {
    let max = u64::MAX;
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("empty file", vec![], "while reading magic"),
        ("bad magic", b"GGML\x03\0\0\0".to_vec(), "bad magic"),
        ("version 1", Bytes::header(1, 0, 0).done(), "unsupported GGUF version 1 "),
        ("version 99", Bytes::header(99, 0, 0).done(), "unsupported GGUF version 99 "),
        ("big-endian", Bytes::header(3u32.swap_bytes(), 0, 0).done(), "big-endian"),
        ("tensor count u64::MAX", Bytes::header(3, max, 0).done(), "tensor count 18446744073709551615 is impossible"),
        ("tensor count 2^40", Bytes::header(3, 1 << 40, 0).done(), "tensor count 1099511627776 is impossible"),
        (
            "metadata count u64::MAX",
            Bytes::header(3, 0, max).done(),
            "metadata count 18446744073709551615 is impossible",
        ),
        ("metadata count 2^40", Bytes::header(3, 0, 1 << 40).done(), "metadata count 1099511627776 is impossible"),
        (
            "metadata count past the end",
            Bytes::header(3, 0, 2).kv("a", VT::U8).u8(1).done(),
            "metadata count 2 is impossible",
        ),
        (
            "tensor count past what the metadata leaves",
            Bytes::header(3, 1, 1).kv("a", VT::String).str(&"x".repeat(40)).done(),
            "tensor count 1 is impossible",
        ),
    ];
    for (what, bytes, want) in cases {
        assert_refused(what, bytes, want);
    }
    let e = assert_refused("version 2^24", Bytes::header(1 << 24, 0, 0).done(), "version");
    assert!(matches!(e, Error::Malformed { offset: 4, .. }), "the version is at byte 4: {e:?}");
}

/// `levels` nested arrays as the value of metadata key `a`, written by hand.
fn nested_array_file(levels: u32) -> Vec<u8> {
    let mut b = Bytes::header(3, 0, 1).kv("a", VT::Array);
    for _ in 1..levels {
        b = b.u32(VT::Array as u32).u64(1);
    }
    b.u32(VT::U8 as u32).u64(0).done()
}

#[test]
fn hostile_metadata_is_refused() {
    let kv1 = || Bytes::header(3, 0, 1);
    let array_of = |elem: VT, n: u64| kv1().kv("a", VT::Array).u32(elem as u32).u64(n).raw(&[0; 16]).done();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("key length u64::MAX", kv1().u64(u64::MAX).raw(&[0; 16]).done(), "while reading metadata key"),
        (
            "string length u64::MAX",
            kv1().kv("s", VT::String).u64(u64::MAX).raw(&[0; 16]).done(),
            "while reading string value",
        ),
        ("array length u64::MAX", array_of(VT::U8, u64::MAX), "array length 18446744073709551615 is impossible"),
        ("array length 2^40", array_of(VT::U64, 1 << 40), "array length 1099511627776 is impossible"),
        ("u8 array one past the end", array_of(VT::U8, 17), "array length 17 is impossible"),
        ("string array past the end", array_of(VT::String, 3), "array length 3 is impossible"),
        ("array of arrays past the end", array_of(VT::Array, 2), "array length 2 is impossible"),
        ("arrays one level too deep", nested_array_file(MAX_NESTING + 1), "arrays nested deeper than 8"),
        ("arrays 100000 deep", nested_array_file(100_000), "arrays nested deeper than 8"),
        ("unknown value type", kv1().str("k").u32(13).u8(0).done(), "unknown metadata value type 13"),
        ("unknown array element type", kv1().kv("a", VT::Array).u32(99).u64(0).done(), "unknown array element type 99"),
        ("bool 2", kv1().kv("b", VT::Bool).u8(2).done(), "bool value 2 is neither 0 nor 1"),
        (
            "key not UTF-8",
            kv1().u64(2).raw(&[0xC3, 0x28]).u32(VT::U8 as u32).u8(0).done(),
            "metadata key is not valid UTF-8",
        ),
        ("string not UTF-8", kv1().kv("s", VT::String).u64(1).u8(0xFF).done(), "string value is not valid UTF-8"),
        ("empty key", kv1().kv("", VT::U8).u8(0).done(), "empty metadata key"),
        (
            "duplicate key",
            Bytes::header(3, 0, 2).kv("a", VT::U8).u8(1).kv("a", VT::I8).u8(2).done(),
            "duplicate metadata key `a`",
        ),
        (
            "alignment 48",
            file_with_alignment(VT::U32, &48u32.to_le_bytes()),
            "general.alignment 48 is not a power of two",
        ),
        ("alignment 0", file_with_alignment(VT::U32, &0u32.to_le_bytes()), "general.alignment 0 is not a power of two"),
        (
            "alignment 2 MiB",
            file_with_alignment(VT::U64, &(1u64 << 21).to_le_bytes()),
            "general.alignment 2097152 is not",
        ),
        (
            "alignment a string",
            file_with_alignment(VT::String, &[2, 0, 0, 0, 0, 0, 0, 0, b'6', b'4']),
            "has type string, expected integer",
        ),
    ];
    for (what, bytes, want) in cases {
        assert_refused(what, bytes, want);
    }
    // The deepest nesting allowed is read.
    let g = Gguf::from_bytes(nested_array_file(MAX_NESTING)).unwrap();
    assert!(matches!(g.get("a"), Some(V::Array(VT::Array, _))));
}

#[test]
fn hostile_tensor_index_is_refused() {
    let f32_id = GgmlType::F32.id();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("unknown type id 4", file_with_tensor(&[4], 4, 0), "tensor `t` has unknown type id 4"),
        ("unknown type id 1000", file_with_tensor(&[4], 1000, 0), "unknown type id 1000"),
        ("0 dimensions", file_with_tensor(&[], f32_id, 0), "tensor `t` has 0 dimensions"),
        ("5 dimensions", file_with_tensor(&[1; 5], f32_id, 0), "tensor `t` has 5 dimensions"),
        ("product overflows u64", file_with_tensor(&[1 << 32, 1 << 32], f32_id, 0), "element count overflows"),
        ("product overflows i64", file_with_tensor(&[1 << 40, 1 << 23], f32_id, 0), "element count overflows"),
        ("dimension past i64", file_with_tensor(&[u64::MAX], f32_id, 0), "dimension 18446744073709551615 is too large"),
        ("byte size overflows", file_with_tensor(&[1 << 62], f32_id, 0), "byte size of F32 overflows"),
        (
            "partial block",
            file_with_tensor(&[33], GgmlType::Q8_0.id(), 0),
            "rows of 33 are not a whole number of Q8_0 blocks",
        ),
        ("offset past the end", file_with_tensor(&[4], f32_id, 1 << 20), "runs past the end of the file"),
        ("offset near u64::MAX", file_with_tensor(&[4], f32_id, u64::MAX - 31), "runs past the end of the file"),
        ("data four bytes short", file_with_tensor(&[17], f32_id, 0), "truncated"),
        ("misaligned offset", file_with_tensor(&[4], f32_id, 8), "offset 8 is not aligned to 32"),
        (
            "misaligned for general.alignment",
            Bytes::header(3, 1, 1)
                .kv("general.alignment", VT::U32)
                .u32(64)
                .tensor("t", &[4], f32_id, 32)
                .pad(64)
                .raw(&[0; 96])
                .done(),
            "offset 32 is not aligned to 64",
        ),
        (
            "duplicate tensor",
            Bytes::header(3, 2, 0)
                .tensor("t", &[4], f32_id, 0)
                .tensor("t", &[4], f32_id, 32)
                .pad(32)
                .raw(&[0; 64])
                .done(),
            "duplicate tensor `t`",
        ),
        (
            "tensor name length u64::MAX",
            Bytes::header(3, 1, 0).u64(u64::MAX).raw(&[0; 40]).done(),
            "while reading tensor name",
        ),
    ];
    for (what, bytes, want) in cases {
        assert_refused(what, bytes, want);
    }
    // The happy neighbour of those cases reads.
    assert_eq!(Gguf::from_bytes(file_with_tensor(&[16], f32_id, 0)).unwrap().tensors[0].size, 64);
}

/// Counts are checked against the bytes that remain, so the reader never allocates for
/// more items than the file could hold: exactly as many as fit read, one more does not.
#[test]
fn counts_are_bounded_by_the_remaining_bytes() {
    let u8_array = |n: u64, present: usize| {
        Bytes::header(3, 0, 1).kv("a", VT::Array).u32(VT::U8 as u32).u64(n).raw(&vec![1; present]).done()
    };
    let g = Gguf::from_bytes(u8_array(16, 16)).unwrap();
    assert_eq!(g.get("a").and_then(V::as_array).map(<[V]>::len), Some(16));
    assert_refused(
        "17 of 16",
        u8_array(17, 16),
        "array length 17 is impossible: at least 1 bytes each, only 16 bytes left",
    );

    let empty_strings =
        |n: u64| Bytes::header(3, 0, 1).kv("a", VT::Array).u32(VT::String as u32).u64(n).raw(&[0; 16]).done();
    assert_eq!(Gguf::from_bytes(empty_strings(2)).unwrap().get("a").and_then(V::as_array).map(<[V]>::len), Some(2));
    assert_refused("3 strings in 16 bytes", empty_strings(3), "array length 3 is impossible");
}

/// A small valid file with metadata of several kinds and three tensors.
fn small_file() -> Vec<u8> {
    let mut w = GgufWriter::new();
    w.set("general.architecture", V::String("tiny".into())).unwrap();
    w.set("tiny.block_count", V::U32(2)).unwrap();
    w.set("tiny.eps", V::F32(1e-6)).unwrap();
    w.set("tiny.flag", V::Bool(true)).unwrap();
    w.set("tiny.tokens", V::Array(VT::String, ["a", "bc", "<s>"].map(|s| V::String(s.into())).to_vec())).unwrap();
    w.set("tiny.ids", V::Array(VT::I32, vec![V::I32(-1), V::I32(5)])).unwrap();
    w.set("tiny.nested", nested(3)).unwrap();
    w.add_tensor("a", GgmlType::F32, vec![8], TensorData::Bytes(f32_bytes((0..8).map(|i| i as f32)))).unwrap();
    let q = quantize_q8_0(&(0..64).map(|i| i as f32 / 7.0).collect::<Vec<_>>());
    w.add_tensor("b", GgmlType::Q8_0, vec![32, 2], TensorData::Bytes(q)).unwrap();
    w.add_tensor("c", GgmlType::F16, vec![4, 2], TensorData::Bytes(f16_bytes((0..8).map(|i| i as f32)))).unwrap();
    w.to_bytes().unwrap()
}

#[test]
fn every_truncation_is_an_error_that_says_so() {
    let bytes = small_file();
    let g = Gguf::from_bytes(bytes.clone()).unwrap();
    // Everything up to the end of the last tensor's data is needed; its padding is not.
    let needed = g.tensors.iter().map(|t| g.data_start + t.offset + t.size).max().unwrap() as usize;
    assert!(needed < bytes.len(), "the sample should end in padding");
    for cut in 0..bytes.len() {
        let prefix = bytes[..cut].to_vec();
        if cut < needed {
            assert_refused(&format!("cut at {cut}"), prefix, "truncated");
        } else {
            assert!(Gguf::from_bytes(prefix).is_ok(), "cut at {cut}, in the final padding");
        }
    }
}

/// Overwrites a few bytes of `b` the way corruption (or an attacker) would.
fn mutate(rng: &mut Rng, b: &mut Vec<u8>, header_len: usize) {
    const U64S: [u64; 7] = [0, 1, 1 << 40, 1 << 63, u64::MAX, u64::MAX - 31, 0xFFFF_FFFF];
    const U32S: [u32; 8] = [0, 1, 4, 5, 9, 13, 99, u32::MAX];
    for _ in 0..=rng.below(3) {
        if b.len() < 8 {
            return;
        }
        // Mostly the header, where every byte means something.
        let span = if rng.below(8) == 0 { b.len() } else { header_len.min(b.len()) };
        let at = rng.below(span as u64 - 7) as usize;
        match rng.below(6) {
            0 => b[at] ^= 1 << rng.below(8),
            1 => b[at] = [0, 1, 0x7F, 0x80, 0xFF][rng.below(5) as usize],
            2 => b[at..at + 8].copy_from_slice(&U64S[rng.below(U64S.len() as u64) as usize].to_le_bytes()),
            3 => b[at..at + 4].copy_from_slice(&U32S[rng.below(U32S.len() as u64) as usize].to_le_bytes()),
            4 => b.truncate(at),
            _ => b[at] = rng.next_u64() as u8,
        }
    }
}

/// What a caller does with a file that parsed: none of it may panic.
fn use_parsed(g: &Gguf) {
    for (k, v) in &g.metadata {
        let _ = (g.get_u64(k), g.get_f64(k), g.get_str(k), g.get_bool(k), v.as_i64());
    }
    let _ = g.architecture();
    for t in &g.tensors {
        let data = g.tensor_data(t);
        assert_eq!(data.len() as u64, t.size);
        if t.ty.is_supported() {
            assert_eq!(dequantize(t.ty, data).unwrap().len() as u64, t.n_elements());
        }
    }
}

#[test]
fn random_corruption_never_panics() {
    let base = small_file();
    let header_len = Gguf::from_bytes(base.clone()).unwrap().header_len as usize;
    let (mut accepted, mut refused) = (0, 0);
    for seed in 0..20_000 {
        let mut rng = Rng::new(seed);
        let mut bytes = base.clone();
        mutate(&mut rng, &mut bytes, header_len);
        let outcome = catch_unwind(AssertUnwindSafe(|| Gguf::from_bytes(bytes).map(|g| use_parsed(&g))));
        match outcome {
            Err(_) => panic!("seed {seed}: the reader panicked on a corrupted file"),
            Ok(Ok(())) => accepted += 1,
            Ok(Err(_)) => refused += 1,
        }
    }
    // Both outcomes are common, or the mutations are not probing anything.
    assert!(accepted > 500 && refused > 10_000, "accepted {accepted}, refused {refused}");
}

#[test]
fn open_names_the_file_it_cannot_read() {
    let missing = TempPath::new("missing");
    let e = Gguf::open(&missing.0).unwrap_err();
    assert!(matches!(&e, Error::Open { path, .. } if *path == missing.0), "{e:?}");
    assert!(e.to_string().contains("strata-gguf-"), "{e}");

    let empty = TempPath::new("empty");
    std::fs::write(&empty.0, []).unwrap();
    let e = Gguf::open(&empty.0).unwrap_err().to_string();
    assert!(e.contains("while reading magic") && e.contains("truncated"), "{e}");
}

#[test]
fn header_index_describes_the_whole_file_from_its_header_alone() {
    let g = Gguf::open(format!("{FIXTURES}tiny-qwen3.gguf")).unwrap();
    let header = &g.bytes()[..g.header_len as usize];
    let idx = Gguf::header_index(header).unwrap();
    assert_eq!(idx.identity, g.identity());
    assert_eq!((idx.header_len, idx.data_start), (g.header_len, g.data_start));
    assert_eq!(idx.file_len, g.tensors.iter().map(|t| g.data_start + t.offset + t.size).max().unwrap());
    assert!(idx.file_len <= g.bytes().len() as u64);
    // A header with bytes missing or extra is refused, not misread.
    assert!(Gguf::header_index(&header[..header.len() - 3]).is_err());
    assert!(Gguf::header_index(&g.bytes()[..header.len() + 1]).is_err());
}
