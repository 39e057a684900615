//! `upstream --fault F`: the faults (resets, early closes, stalls, slow closes, refusals,
//! blackholes, trickles) live in the test kit; `sluice-stress upstream` serves them.

pub use sluice_testkit::chaos::*;
