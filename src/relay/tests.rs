//! Unit tests of a direction's states with in-memory I/O.
