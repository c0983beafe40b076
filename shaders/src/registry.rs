//! The kernel registry: each `.wgsl` file under `wgsl/`, embedded at compile time.

use std::fmt;

use crate::include::{IncludeError, PIECES, Resolver};
use crate::specialise::{SpecialiseError, specialise};

/// A named WGSL kernel file. Its text may include shared pieces, so compile
/// [`Kernel::source`] or [`Kernel::assemble`], not [`Kernel::text`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kernel {
    pub name: &'static str,
    text: &'static str,
}

/// Why a kernel's source could not be put together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AssembleError {
    Include(IncludeError),
    Specialise(SpecialiseError),
}

impl fmt::Display for AssembleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Include(e) => e.fmt(f),
            Self::Specialise(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for AssembleError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Include(e) => Some(e),
            Self::Specialise(e) => Some(e),
        }
    }
}

impl From<IncludeError> for AssembleError {
    fn from(e: IncludeError) -> Self {
        Self::Include(e)
    }
}

impl From<SpecialiseError> for AssembleError {
    fn from(e: SpecialiseError) -> Self {
        Self::Specialise(e)
    }
}

impl Kernel {
    pub(crate) const fn new(name: &'static str, text: &'static str) -> Self {
        Self { name, text }
    }

    /// The file as written: include directives not yet resolved.
    pub fn text(&self) -> &'static str {
        self.text
    }

    /// The kernel with its includes resolved and default constants. Kernels that call
    /// `load8` still need a weight-format prelude: see [`Kernel::assemble`].
    pub fn source(&self) -> Result<String, IncludeError> {
        let mut r = Resolver::new(PIECES);
        r.push(self.name, self.text)?;
        Ok(r.finish())
    }

    /// What gets compiled: `preludes` in order (e.g. a weight format, an x prelude), then
    /// the kernel, includes resolved (a piece several include is pasted once), then
    /// `consts` specialised — also constants that come from preludes and included pieces.
    pub fn assemble(&self, preludes: &[Kernel], consts: &[(&str, String)]) -> Result<String, AssembleError> {
        let mut r = Resolver::new(PIECES);
        for p in preludes {
            r.push(p.name, p.text)?;
        }
        r.push(self.name, self.text)?;
        Ok(specialise(&r.finish(), consts)?)
    }
}

/// Declares `Kernel::NAME` constants for `.wgsl` files and a list of them.
macro_rules! kernels {
    ($list:ident: $($ident:ident => $file:literal),* $(,)?) => {
        impl $crate::Kernel {
            $(pub const $ident: $crate::Kernel = $crate::Kernel::new($file, include_str!(concat!("../wgsl/", $file, ".wgsl")));)*
        }
        pub const $list: &[$crate::Kernel] = &[$($crate::Kernel::$ident),*];
    };
}
pub(crate) use kernels;

kernels! { MISC: READ_BANDWIDTH => "read_bandwidth" }

/// Every kernel, for tests that validate them all.
pub fn all() -> impl Iterator<Item = Kernel> {
    MISC.iter().chain(crate::matmul::MATMUL).chain(crate::ops::OPS).chain(crate::deltanet::DELTANET).copied()
}
