//! The kernel registry: each `.wgsl` file under `wgsl/`, embedded at compile time.

/// A named WGSL source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kernel {
    pub name: &'static str,
    pub source: &'static str,
}

/// Declares `Kernel::NAME` constants for `.wgsl` files and a list of them.
macro_rules! kernels {
    ($list:ident: $($ident:ident => $file:literal),* $(,)?) => {
        impl $crate::Kernel {
            $(pub const $ident: $crate::Kernel = $crate::Kernel { name: $file, source: include_str!(concat!("../wgsl/", $file, ".wgsl")) };)*
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
