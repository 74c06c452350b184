//! C ABI (being built).
