//! Includes: a line `//#include "common/NAME.wgsl"` is replaced by that shared piece.
//!
//! The directive is a WGSL comment, so editors and formatters leave it alone. It must
//! start at column 0 and name a piece by its path under `wgsl/`, in double quotes. Pieces
//! may include pieces. Each piece is pasted at most once per assembled source (later
//! includes of it are dropped), so a kernel and its prelude may both include
//! `common/step.wgsl`. Including a piece from inside itself, directly or not, is an error.

use std::fmt;

/// The directive, at the start of a line.
pub const DIRECTIVE: &str = "//#include";

/// The shared pieces, by the name includes use: their path under `wgsl/`.
pub(crate) const PIECES: &[(&str, &str)] = &[
    ("common/step.wgsl", include_str!("../wgsl/common/step.wgsl")),
    ("common/elementwise.wgsl", include_str!("../wgsl/common/elementwise.wgsl")),
    ("common/matmul.wgsl", include_str!("../wgsl/common/matmul.wgsl")),
    ("common/tile.wgsl", include_str!("../wgsl/common/tile.wgsl")),
    ("common/batch.wgsl", include_str!("../wgsl/common/batch.wgsl")),
    ("common/attention.wgsl", include_str!("../wgsl/common/attention.wgsl")),
    ("common/sample.wgsl", include_str!("../wgsl/common/sample.wgsl")),
    ("common/workgroup_sum.wgsl", include_str!("../wgsl/common/workgroup_sum.wgsl")),
    ("common/nibbles.wgsl", include_str!("../wgsl/common/nibbles.wgsl")),
];

/// Every shared piece as (name, text), e.g. for tests and tools.
pub fn pieces() -> impl Iterator<Item = (&'static str, &'static str)> {
    PIECES.iter().copied()
}

/// Why a source's includes could not be resolved. `file` and `line` (1-based) locate the
/// directive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IncludeError {
    /// The named piece does not exist.
    Unknown { file: String, line: usize, name: String },
    /// A piece includes itself; `chain` runs from the outermost file to the repeated piece.
    Cycle { chain: Vec<String> },
    /// The line starts with the directive but does not name a piece in double quotes.
    Malformed { file: String, line: usize },
}

impl fmt::Display for IncludeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unknown { file, line, name } => write!(f, "{file}:{line}: no shared piece \"{name}\" to include"),
            Self::Cycle { chain } => write!(f, "include cycle: {}", chain.join(" -> ")),
            Self::Malformed { file, line } => {
                write!(f, "{file}:{line}: expected {DIRECTIVE} \"common/NAME.wgsl\"")
            }
        }
    }
}

impl std::error::Error for IncludeError {}

/// The named piece a directive line asks for: `None` for an ordinary line.
fn directive(line: &str) -> Option<Option<&str>> {
    let rest = line.strip_prefix(DIRECTIVE)?;
    let name = rest.trim().strip_prefix('"').and_then(|r| r.strip_suffix('"'));
    // Near misses such as `//#includes` are errors rather than silently kept as comments.
    if !rest.starts_with([' ', '\t', '"']) {
        return Some(None);
    }
    Some(name.filter(|n| !n.is_empty() && !n.contains('"')))
}

/// Expands includes in sources pasted one after the other (e.g. a prelude, then a kernel),
/// against `pieces`; a piece is pasted once for all of them.
pub(crate) struct Resolver<'p> {
    pieces: &'p [(&'p str, &'p str)],
    out: String,
    stack: Vec<String>,
    done: Vec<&'p str>,
}

impl<'p> Resolver<'p> {
    pub(crate) fn new(pieces: &'p [(&'p str, &'p str)]) -> Self {
        Self { pieces, out: String::new(), stack: Vec::new(), done: Vec::new() }
    }

    /// Appends `text` (named `file` in errors) with its includes expanded.
    pub(crate) fn push(&mut self, file: &str, text: &str) -> Result<(), IncludeError> {
        self.stack.push(file.to_owned());
        for (i, line) in text.split_inclusive('\n').enumerate() {
            let Some(name) = directive(line) else {
                self.out.push_str(line);
                continue;
            };
            let name = name.ok_or_else(|| IncludeError::Malformed { file: file.to_owned(), line: i + 1 })?;
            let Some(&(piece, body)) = self.pieces.iter().find(|(n, _)| *n == name) else {
                return Err(IncludeError::Unknown { file: file.to_owned(), line: i + 1, name: name.to_owned() });
            };
            if self.stack.iter().any(|s| s == piece) {
                let mut chain = self.stack.clone();
                chain.push(piece.to_owned());
                return Err(IncludeError::Cycle { chain });
            }
            if self.done.contains(&piece) {
                continue;
            }
            // Marks where the piece starts, for reading compiler errors against the output.
            self.out.push_str(&format!("// from \"{piece}\":\n"));
            self.push(piece, body)?;
            self.done.push(piece);
        }
        if !self.out.is_empty() && !self.out.ends_with('\n') {
            self.out.push('\n');
        }
        self.stack.pop();
        Ok(())
    }

    pub(crate) fn finish(self) -> String {
        self.out
    }
}

/// `text` (named `file` in errors) with its includes of the shared pieces expanded.
pub fn resolve(file: &str, text: &str) -> Result<String, IncludeError> {
    let mut r = Resolver::new(PIECES);
    r.push(file, text)?;
    Ok(r.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve_in(pieces: &[(&str, &str)], text: &str) -> Result<String, IncludeError> {
        let mut r = Resolver::new(pieces);
        r.push("k.wgsl", text)?;
        Ok(r.finish())
    }

    #[test]
    fn pastes_pieces_once_and_nested() {
        let pieces = [("a.wgsl", "//#include \"b.wgsl\"\nconst A: u32 = 1u;"), ("b.wgsl", "const B: u32 = 2u;\n")];
        let out = resolve_in(&pieces, "//#include \"a.wgsl\"\n//#include \"b.wgsl\"\nfn f() {}\n").unwrap();
        assert_eq!(
            out,
            "// from \"a.wgsl\":\n// from \"b.wgsl\":\nconst B: u32 = 2u;\nconst A: u32 = 1u;\nfn f() {}\n"
        );
    }

    #[test]
    fn ordinary_lines_pass_unchanged() {
        let text = "// #include \"x\" is prose here\n  //#include \"indented.wgsl\"\nfn f() {}";
        assert_eq!(resolve_in(&[], text).unwrap(), format!("{text}\n"));
    }

    #[test]
    fn unknown_piece_is_an_error() {
        let err = resolve_in(&[], "fn f() {}\n//#include \"nope.wgsl\"\n").unwrap_err();
        assert_eq!(err, IncludeError::Unknown { file: "k.wgsl".into(), line: 2, name: "nope.wgsl".into() });
        assert!(err.to_string().contains("nope.wgsl"));
    }

    #[test]
    fn cycle_is_an_error() {
        let pieces = [("a.wgsl", "//#include \"b.wgsl\"\n"), ("b.wgsl", "//#include \"a.wgsl\"\n")];
        let err = resolve_in(&pieces, "//#include \"a.wgsl\"\n").unwrap_err();
        assert_eq!(
            err,
            IncludeError::Cycle { chain: vec!["k.wgsl".into(), "a.wgsl".into(), "b.wgsl".into(), "a.wgsl".into()] }
        );
        let own = [("a.wgsl", "//#include \"a.wgsl\"\n")];
        assert!(matches!(resolve_in(&own, "//#include \"a.wgsl\"\n"), Err(IncludeError::Cycle { .. })));
    }

    #[test]
    fn malformed_directive_is_an_error() {
        for line in ["//#include common/step.wgsl", "//#include \"\"", "//#includes \"a.wgsl\"", "//#include \"a.wgsl"]
        {
            let err = resolve_in(&[("a.wgsl", "")], line).unwrap_err();
            assert_eq!(err, IncludeError::Malformed { file: "k.wgsl".into(), line: 1 }, "{line}");
        }
    }
}
