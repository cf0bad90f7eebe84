//! Plain data shared by the verbs wrapper and its stand-in in builds without RDMA.

/// What one side tells the other to connect a queue pair (and, from the receiving end, where its
/// pool lies: no key comes with it; each grant carries its own).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerInfo {
    /// Queue pair number.
    pub qpn: u32,
    /// First packet sequence number.
    pub psn: u32,
    /// The port's GID at the chosen index (RoCEv2: the IPv4-mapped address).
    pub gid: [u8; 16],
    /// Path MTU enum value the side can do (ibv_mtu: 1 = 256 … 5 = 4096).
    pub mtu: u8,
    /// Address of the pool's first byte (the receiving end's; 0 for the sending end).
    pub addr: u64,
}

/// A finished work request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkCompletion {
    /// The id given when it was posted.
    pub wr_id: u64,
    /// `Ok` or the failed status, as libibverbs names it.
    pub status: Result<(), WcError>,
    /// The immediate value (host order) of a WRITE WITH IMM.
    pub imm: u32,
}

/// A work completion's error status (`ibv_wc_status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WcError(pub u32);

/// What an endpoint lets its peer do to the memory it registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// The sending end of a hop: its pool is only read, by its own NIC, for the RDMA WRITEs it
    /// posts. The region and the queue pair grant no remote access, and the endpoint advertises
    /// no key or address (both 0): a downstream peer cannot write into the sender's slots.
    SendOnly,
    /// The receiving end: the peer RDMA-WRITEs chunks into the slots it is granted, and only
    /// there. The mapping's first `slots` slots of `slot_size` bytes are registered one region
    /// each, with no remote access of their own; a grant binds a type-2 memory window over one
    /// slot (its key goes with the credit) and the grant ends with the window's invalidation.
    Grants {
        /// Bytes per slot (slot `i` starts at `i * slot_size`).
        slot_size: usize,
        /// Number of slots.
        slots: usize,
    },
}
