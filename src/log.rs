//! Logging (being built).
