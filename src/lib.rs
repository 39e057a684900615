//! sluice: a TCP proxy with bounded per-direction buffers.
