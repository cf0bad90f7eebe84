//! The sans-IO core: the chain's decisions as values in, values out, with time passed in.
//!
//! Nothing here does I/O or reads the clock; the drivers (`chain.rs`'s session, `server.rs`,
//! `push.rs`) feed it what happened and carry out what it says. That keeps every decision
//! testable step by step, and whole chains testable in one process (`sim.rs`, tests only).
//!
//! - [`machine`]: [`NodeMachine`], one push on one node: chunks in, forwards, writes, acks,
//!   sync, publish and reports out.
//! - [`route`]: which chunks of a push go where ([`Route`], [`ChunkSet`]).
//! - [`admission`]: a HELLO against this replica's serve policy: admit (with its own entries,
//!   its rights and whether chunks are sealed) or reject (with the error to send back).
//! - [`repair`]: the reports of one attempt of a push -> the next attempt, or the final result.
//! - [`stall`]: the downstream hop's deadline, driven by `Tick { now }`.
//! - [`lanes`]: when a lane of a hop of several may take a slot for its next frame.

#![deny(unsafe_code)]

pub(crate) mod admission;
pub(crate) mod lanes;
pub(crate) mod machine;
pub(crate) mod repair;
pub(crate) mod route;
#[cfg(test)]
mod sim;
pub(crate) mod stall;

pub(crate) use machine::{Action, Event, NodeMachine, Role};
