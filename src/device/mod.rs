//! Devices (being built).
