//! The harness of the system tests: a whole deployment per test as real
//! processes, and the checks every scenario needs (see [`deployment`]).

pub mod deployment;

pub use deployment::*;
