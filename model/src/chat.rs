//! Chat templates (placeholder, being written).
