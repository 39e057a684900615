//! The verifiable byte stream, which lives in the test kit beside the stand-in upstreams
//! that write and check it.

pub use sluice_testkit::pattern::*;
