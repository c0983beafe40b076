//! Every kernel, assembled as it will be compiled, is checked with naga (no GPU needed).

use std::collections::HashMap;
use std::path::Path;

use crate::matmul::{COOP_PRELUDES, FORMATS, Q8_0_READERS, WEIGHT_READERS, X_PRELUDES, X_READERS};
use crate::{Kernel, all, include};

/// Parses and validates `src` as wgpu would before handing it to a driver.
fn validate(label: &str, src: &str) {
    let module = naga::front::wgsl::parse_str(src).unwrap_or_else(|e| panic!("{label}: {}", e.emit_to_string(src)));
    // Subgroups: only mm_rows's broadcasts use them, on adapters that have them. f16 packing
    // (unpack2x16float) wgpu allows on every adapter it runs on.
    use naga::valid::Capabilities as C;
    // f16 values and cooperative matrices: only mm_coop, on adapters that offer both.
    let caps = C::SUBGROUP | C::SHADER_FLOAT16_IN_FLOAT32 | C::SHADER_FLOAT16 | C::COOPERATIVE_MATRIX;
    let mut v = naga::valid::Validator::new(naga::valid::ValidationFlags::all(), caps);
    v.validate(&module).unwrap_or_else(|e| panic!("{label}: {}", e.emit_to_string(src)));
}

#[test]
fn every_kernel_assembles_and_validates() {
    for k in all() {
        if FORMATS.contains(&k) || X_PRELUDES.contains(&k) || COOP_PRELUDES.contains(&k) {
            // A prelude alone has no entry point, but must still be valid.
            validate(k.name, &k.source().unwrap());
        } else if X_READERS.contains(&k) {
            for f in FORMATS {
                for x in X_PRELUDES {
                    let src = k.assemble(&[*f, *x], &[]).unwrap();
                    validate(&format!("{}+{}+{}", k.name, f.name, x.name), &src);
                }
            }
        } else if k == Kernel::MM_COOP {
            for c in COOP_PRELUDES {
                for f in FORMATS {
                    let src = k.assemble(&[*c, *f, Kernel::X_STORAGE], &[("TM", "2u".into())]).unwrap();
                    validate(&format!("{}+{}+{}", k.name, c.name, f.name), &src);
                }
            }
        } else if Q8_0_READERS.contains(&k) {
            let src = k.assemble(&[Kernel::Q_Q8_0], &[("S", "1u".into()), ("TB", "3u".into())]).unwrap();
            validate(&format!("{}+q_q8_0", k.name), &src);
            validate(&format!("{}+q_q8_0 (default)", k.name), &k.assemble(&[Kernel::Q_Q8_0], &[]).unwrap());
        } else if WEIGHT_READERS.contains(&k) {
            for f in FORMATS {
                validate(&format!("{}+{}", k.name, f.name), &k.assemble(&[*f], &[]).unwrap());
            }
        } else {
            validate(k.name, &k.assemble(&[], &[]).unwrap());
        }
    }
}

#[test]
fn load8_callers_are_weight_readers() {
    for k in all() {
        let src = k.source().unwrap();
        let calls = src.contains("load8(");
        let defines = src.contains("fn load8(");
        assert_eq!(defines, FORMATS.contains(&k), "{}", k.name);
        assert_eq!(calls && !defines, WEIGHT_READERS.contains(&k), "{}", k.name);
    }
}

#[test]
fn constants_of_pieces_specialise() {
    // mm_rows's S is also what common/matmul.wgsl's `tree` sums over.
    let consts = [("WG", "64u".to_owned()), ("S", "4u".to_owned())];
    let src = Kernel::MM_ROWS.assemble(&[Kernel::Q_Q8_0, Kernel::X_STORAGE], &consts).unwrap();
    assert!(src.contains("const WG: u32 = 64u;\n") && src.contains("const S: u32 = 4u;\n"));
    validate("mm_rows specialised", &src);
    let err = Kernel::SWIGLU.assemble(&[], &[("NOPE", "1u".into())]).unwrap_err();
    assert!(matches!(err, crate::AssembleError::Specialise(_)), "{err}");
}

#[test]
fn a_piece_is_pasted_once_per_source() {
    // Both the kernel and common/matmul.wgsl include common/step.wgsl.
    let src = Kernel::MM_TILE.assemble(&[Kernel::Q_Q4_K, Kernel::X_STORAGE], &[]).unwrap();
    assert_eq!(src.matches("struct Step {").count(), 1);
    assert!(!src.lines().any(|l| l.starts_with(include::DIRECTIVE)));
}

fn wgsl_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".wgsl"))
        .collect();
    names.sort();
    names
}

#[test]
fn every_file_is_registered_and_every_piece_used() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("wgsl");
    let mut kernels: Vec<String> = all().map(|k| format!("{}.wgsl", k.name)).collect();
    kernels.sort();
    assert_eq!(wgsl_files(&root), kernels, "kernel files vs the registry");
    let mut pieces: Vec<String> = include::pieces().map(|(n, _)| n.to_owned()).collect();
    pieces.sort();
    let on_disk: Vec<String> = wgsl_files(&root.join("common")).into_iter().map(|n| format!("common/{n}")).collect();
    assert_eq!(on_disk, pieces, "files under common/ vs the pieces");
    for (name, _) in include::pieces() {
        let directive = format!("{} \"{name}\"", include::DIRECTIVE);
        let users = all().map(|k| k.text()).chain(include::pieces().map(|(_, t)| t));
        assert!(users.filter(|t| t.lines().any(|l| l == directive)).count() > 0, "{name} is included nowhere");
    }
}

/// The `struct NAME { ... }` blocks of a file, comments and blank lines dropped.
fn structs(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur: Option<String> = None;
    for line in text.lines() {
        let code = line.split("//").next().unwrap().trim();
        if code.is_empty() {
            continue;
        }
        if code.starts_with("struct ") {
            cur = Some(String::new());
        }
        if let Some(s) = cur.as_mut() {
            s.push_str(code);
            s.push('\n');
            if code == "}" {
                out.push(cur.take().unwrap());
            }
        }
    }
    out
}

#[test]
fn no_struct_is_written_twice() {
    let files = all().map(|k| (k.name, k.text())).chain(include::pieces());
    let mut seen: HashMap<String, &str> = HashMap::new();
    for (file, text) in files {
        for s in structs(text) {
            if let Some(first) = seen.insert(s.clone(), file) {
                panic!("{file} and {first} both declare\n{s}put it in a piece under common/");
            }
        }
    }
}
