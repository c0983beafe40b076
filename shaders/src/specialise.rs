//! Specialisation: replace the value of top-level `const NAME: T = value;` declarations.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecialiseError(pub String);

impl fmt::Display for SpecialiseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SpecialiseError {}

/// Returns `src` with each `const NAME: TYPE = ...;` (at the start of a line) given the
/// value from `consts`. Every constant named must exist, so a typo cannot silently
/// leave a default in place.
pub fn specialise(src: &str, consts: &[(&str, String)]) -> Result<String, SpecialiseError> {
    let mut out = String::with_capacity(src.len());
    let mut used = vec![false; consts.len()];
    for line in src.split_inclusive('\n') {
        let replaced = line.strip_prefix("const ").and_then(|rest| {
            let (name, tail) = rest.split_once(':')?;
            let i = consts.iter().position(|(n, _)| *n == name.trim())?;
            let (ty, _) = tail.split_once('=')?;
            used[i] = true;
            Some(format!("const {}:{}= {};\n", name.trim(), ty, consts[i].1))
        });
        match replaced {
            Some(l) => out.push_str(&l),
            None => out.push_str(line),
        }
    }
    if let Some(i) = used.iter().position(|u| !u) {
        return Err(SpecialiseError(format!("no `const {}` to specialise", consts[i].0)));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_named_constants_only() {
        let src = "const WG: u32 = 64u;\nconst EPS: f32 = 1e-6;\nfn f() {}\n";
        let out = specialise(src, &[("WG", "128u".into())]).unwrap();
        assert_eq!(out, "const WG: u32 = 128u;\nconst EPS: f32 = 1e-6;\nfn f() {}\n");
    }

    #[test]
    fn unknown_constant_is_an_error() {
        let err = specialise("const A: u32 = 1u;\n", &[("B", "2u".into())]).unwrap_err();
        assert!(err.0.contains("const B"));
    }
}
