//! The two roles, each a composition of the layers below it: the primary (`primary.rs`: scan
//! the source, dial the chain, run the session, collect reports, repair) and the replica
//! (`replica.rs`: the control plane that accepts connections, then per push: admit, reserve,
//! dial onward, run the session, publish).

pub(crate) mod lanes;
pub mod primary;
pub mod replica;
