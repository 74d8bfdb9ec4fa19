//! userptr: placeholder
pub use userptr_ring as ring;
