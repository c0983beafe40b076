//! Kernels on activations: norms, RoPE, attention, element-wise ops, sampling, the router
//! and the weighted sum of a mixture of experts.

crate::registry::kernels! { OPS:
    RMS_NORM => "rms_norm",
    ROPE => "rope",
    KV_STORE => "kv_store",
    ATTENTION => "attention",
    ATTENTION_SG => "attention_sg",
    SWIGLU => "swiglu",
    GATHER_ROWS => "gather_rows",
    MTP_SELECT => "mtp_select",
    TOP_K => "top_k",
    PENALIZE => "penalize",
    MOE_ROUTE => "moe_route",
    MOE_COMBINE => "moe_combine",
}
