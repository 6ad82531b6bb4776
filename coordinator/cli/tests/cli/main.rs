//! The `fedq` command's tests, one test binary: the real binaries as a
//! researcher, a partner and a federation's operator run them.

mod ca;
mod commands;
mod python;
