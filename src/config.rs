//! Configuration keys (being built).
