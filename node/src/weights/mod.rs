//! GPU weights: quantised matrices repacked into aligned layouts, split across bindings.
