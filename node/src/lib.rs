pub use wgpu;
