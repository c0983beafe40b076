//! Kernels on activations: norms, RoPE, attention, element-wise ops, sampling.

crate::registry::kernels! { OPS:
    RMS_NORM => "rms_norm",
    ROPE => "rope",
    KV_STORE => "kv_store",
    ATTENTION => "attention",
    ATTENTION_SG => "attention_sg",
    SWIGLU => "swiglu",
    GATHER_ROWS => "gather_rows",
    TOP_K => "top_k",
    PENALIZE => "penalize",
}
