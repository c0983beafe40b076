//! Kernels of qwen35's Gated DeltaNet layers: conv + norms, the delta rule, the gated norm.

crate::registry::kernels! { DELTANET:
    DELTANET_CONV => "deltanet_conv",
    DELTANET_CONV_STATE => "deltanet_conv_state",
    DELTANET_STATE => "deltanet_state",
    DELTANET_GATED_NORM => "deltanet_gated_norm",
}
