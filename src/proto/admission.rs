//! A HELLO against this replica's serve policy: admit or reject, with no I/O.
//!
//! Two checks, at the two points where the replica decides:
//! - [`check_hello`], as soon as a HELLO decodes (before it takes a session slot): the limits
//!   this replica sets (`--max-chain`, `--max-entries`, `--pool-mb`) and node names that are
//!   addresses. The fuzz targets run it on every HELLO they decode.
//! - [`admit`], when the push session starts (before anything is staged or dialed): encryption
//!   against how the peer authenticated, the routed push's own entries, the push's rights (the
//!   HELLO's grant narrowed by this replica's ACL) and the `--max-version-ahead` bound. It
//!   returns what the session goes on with ([`Admit`]) or the error to send back.
//!
//! What a check needs from the outside (the peer's key, the version published here now) comes
//! in as values ([`Peer`]), so the same checks run in the simulated chain of the tests.

use crate::auth::AclEntry;
use crate::error::{ErrorKind, NodeError};
use crate::manifest::Subset;
use crate::server::ServeOptions;
use crate::transport::Transport;
use crate::wire::{self, Hello, Limits};

/// The parts of `serve`'s options that decide whether a push is admitted.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Policy<'a> {
    /// `--max-chain`: nodes from this one to the tail.
    pub max_chain: usize,
    /// `--max-entries`: manifest entries.
    pub max_entries: usize,
    /// `--pool-mb`, in bytes: must hold enough chunks of the push's size.
    pub pool_bytes: usize,
    /// `serve --encrypt`: only encrypted pushes.
    pub require_encrypt: bool,
    /// The id of this replica's own cluster key (`--key-file`), which has every right.
    pub own_key: Option<&'a str>,
    /// `--acl`: more keys, each limited.
    pub acl: &'a [AclEntry],
    /// `--max-version-ahead` (0: no limit).
    pub max_version_ahead: u64,
}

impl<'a> From<&'a ServeOptions> for Policy<'a> {
    fn from(opts: &'a ServeOptions) -> Self {
        Self {
            max_chain: opts.limits.max_chain,
            max_entries: opts.limits.max_entries,
            pool_bytes: opts.pool_bytes,
            require_encrypt: opts.require_encrypt,
            own_key: opts.auth.key().map(crate::auth::ClusterKey::id),
            acl: &opts.acl,
            max_version_ahead: opts.limits.max_version_ahead,
        }
    }
}

/// What the replica knows about the push besides its HELLO.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Peer<'a> {
    /// The upstream connection authenticated (cluster key or mutual TLS): there is a key to
    /// derive the hop's encryption key from.
    pub authenticated: bool,
    /// The id of the key the upstream peer authenticated with, if any.
    pub key_id: Option<&'a str>,
    /// The version of the push's name that is `current` here now, if any.
    pub current_version: Option<u64>,
}

/// An admitted push: what the session goes on with.
#[derive(Debug, Clone)]
pub(crate) struct Admit {
    /// Chunks are sealed on every TCP hop (`--encrypt`).
    pub encrypt: bool,
    /// A routed push: this node stores only the entries it wants: the map from its manifest's
    /// entries to the push's, and that manifest.
    pub own: Option<Subset>,
    /// Whose key the push started with (empty: none known): the next node's HELLO carries it.
    pub origin: String,
    /// The push's rights here: the HELLO's grant narrowed by this replica's rule for the peer's
    /// key and for the push's origin (None: no limits).
    pub limits: Option<Limits>,
}

/// The checks a HELLO must pass before anything is staged or dialed: the limits this replica
/// sets (`--max-chain`, `--max-entries`, `--pool-mb`) and node names that are addresses.
pub(crate) fn check_hello(hello: &Hello, policy: &Policy<'_>) -> Result<(), NodeError> {
    let nodes = hello.downstream.len() + 1;
    if nodes > policy.max_chain {
        return Err(NodeError::new(
            ErrorKind::Unsupported,
            format!(
                "a chain of {nodes} nodes from here is longer than this replica allows (serve --max-chain {})",
                policy.max_chain
            ),
        ));
    }
    let entries = hello.manifest.entries().len();
    if entries > policy.max_entries {
        return Err(NodeError::new(
            ErrorKind::BadManifest,
            format!(
                "the manifest lists {entries} entries, more than this replica accepts (serve --max-entries {})",
                policy.max_entries
            ),
        ));
    }
    crate::pool::check_budget(policy.pool_bytes, hello.manifest.chunk_size())
        .map_err(|why| NodeError::new(ErrorKind::Unsupported, format!("{why} (serve --pool-mb)")))?;
    for node in std::iter::once(&hello.you).chain(&hello.downstream) {
        check_node(node)
            .map_err(|why| NodeError::new(ErrorKind::Protocol, format!("bad HELLO: node {node:?} {why}")))?;
    }
    Ok(())
}

/// A node name as the chain lists it: `HOST:PORT`, printable, no spaces (it is dialed, logged
/// and reported, so nothing else passes).
pub(crate) fn check_node(node: &str) -> Result<(), &'static str> {
    if node.is_empty() || node.len() > 255 {
        return Err("is not 1 to 255 bytes long");
    }
    if !node.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("holds characters that are not printable ASCII");
    }
    match node.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => Ok(()),
        _ => Err("is not HOST:PORT"),
    }
}

/// Whether the push session may start, in the order the replica has always checked:
/// encryption, the routed push's own entries, the rights, the version bound.
pub(crate) fn admit(hello: &Hello, policy: &Policy<'_>, peer: &Peer<'_>) -> Result<Admit, NodeError> {
    // Encrypted chunks: each hop's key comes from its authentication, so both hops of this
    // node must have authenticated, and chunks go over TCP.
    let encrypt = hello.flags.has(wire::HelloFlags::ENCRYPT);
    if encrypt && !peer.authenticated {
        return Err(NodeError::new(
            ErrorKind::Unsupported,
            "the push asks for encryption (--encrypt), but the connection to this replica is not \
             authenticated, so there is no key to derive: start it with --key-file (or --tls-cert, --tls-key \
             and --tls-ca)",
        ));
    }
    if policy.require_encrypt && !encrypt {
        return Err(NodeError::new(
            ErrorKind::Unauthorized,
            "this replica accepts only encrypted pushes (serve --encrypt): push with --encrypt and the cluster key",
        ));
    }
    if encrypt && hello.transport == Transport::Rdma {
        return Err(NodeError::new(ErrorKind::Unsupported, "encrypted pushes travel over TCP, not RDMA"));
    }
    // A routed push (epoch staging): this node stores only the entries it wants.
    let own = match hello.wants.first() {
        Some(Some(wanted)) => match hello.manifest.subset(wanted) {
            Ok(own) => Some(own),
            Err(e) => return Err(NodeError::new(ErrorKind::BadManifest, e.to_string())),
        },
        _ => None,
    };
    let (origin, limits) = rights(hello, policy, peer.key_id)?;
    // `current` only moves forward, so one push of a huge version would pin it for good: a
    // version too far beyond `current` is refused (`--max-version-ahead`).
    if let Some(cur) = peer.current_version
        && policy.max_version_ahead > 0
        && hello.version > cur.saturating_add(policy.max_version_ahead)
    {
        return Err(NodeError::new(
            ErrorKind::Unauthorized,
            format!(
                "version {} of '{}' is more than {} beyond its current version {cur}: refused so that one push \
                 cannot pin `current` (which only moves forward); push a nearer version, or raise serve \
                 --max-version-ahead (0: no limit)",
                hello.version, hello.name, policy.max_version_ahead
            ),
        ));
    }
    Ok(Admit { encrypt, own, origin, limits })
}

/// The push's rights here: the limits the nodes before this one put on it (HELLO's grant),
/// narrowed by this replica's ACL rule for the key the peer authenticated with and for the key
/// the push started with. A relay forwards on the pusher's behalf, never with more. Returns the
/// origin and the limits, or why the push may not do what it asks.
fn rights(hello: &Hello, policy: &Policy<'_>, key_id: Option<&str>) -> Result<(String, Option<Limits>), NodeError> {
    let rule = |id: &str| {
        let limited = policy.own_key.is_none_or(|k| k != id);
        limited.then(|| policy.acl.iter().find(|e| e.key.id() == id).map(AclEntry::limits)).flatten()
    };
    let origin = if hello.grant.origin.is_empty() { key_id.unwrap_or_default() } else { &hello.grant.origin };
    let limits = [key_id.and_then(rule), rule(origin)]
        .iter()
        .fold(hello.grant.limits.clone(), |acc, l| Limits::intersect(acc.as_ref(), l.as_ref()));
    if let Some(l) = &limits {
        let who = if origin.is_empty() { "this push".to_owned() } else { format!("key {origin}") };
        if !l.allows(&hello.name) {
            let why = format!("{who} may not push '{}' (it may push names starting with {:?})", hello.name, l.names);
            return Err(NodeError::new(ErrorKind::Unauthorized, why));
        }
        if hello.keep > 0 && !l.prune {
            let why = format!(
                "{who} may not prune versions (the push asks to keep {}): push without --keep (each replica keeps \
                 its own --keep), or allow it with `prune = true` in the ACL",
                hello.keep
            );
            return Err(NodeError::new(ErrorKind::Unauthorized, why));
        }
    }
    Ok((origin.to_owned(), limits))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::Manifest;
    use crate::wire::{Grant, HelloFlags, Mode};

    fn hello(you: &str, downstream: &[&str]) -> Hello {
        Hello {
            name: "ckpt".into(),
            version: 7,
            mode: Mode::Sync,
            transport: Transport::Tcp,
            keep: 0,
            flags: HelloFlags::default(),
            you: you.into(),
            downstream: downstream.iter().map(|s| s.to_string()).collect(),
            manifest: Manifest::plan_for_files(wire::MIN_CHUNK, &[("a", 10), ("b", 20)]).unwrap().0,
            wants: Vec::new(),
            grant: Grant::default(),
            lanes: 1,
        }
    }

    fn policy() -> Policy<'static> {
        Policy {
            max_chain: 16,
            max_entries: 1000,
            pool_bytes: 64 << 20,
            require_encrypt: false,
            own_key: None,
            acl: &[],
            max_version_ahead: 100,
        }
    }

    #[test]
    fn check_hello_refuses_long_chains_and_bad_names() {
        let h = hello("r1:1", &["r2:2", "r3:3"]);
        assert!(check_hello(&h, &policy()).is_ok());
        let e = check_hello(&h, &Policy { max_chain: 2, ..policy() }).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Unsupported);
        assert!(e.message.contains("--max-chain 2"), "{e}");
        let e = check_hello(&h, &Policy { max_entries: 1, ..policy() }).unwrap_err();
        assert_eq!(e.kind, ErrorKind::BadManifest);
        let e = check_hello(&hello("r1:1", &["r 2:2"]), &policy()).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Protocol);
        assert!(e.message.contains("\"r 2:2\""), "{e}");
        assert_eq!(check_node("host"), Err("is not HOST:PORT"));
        assert_eq!(check_node(":80"), Err("is not HOST:PORT"));
        assert_eq!(check_node("h:80"), Ok(()));
    }

    #[test]
    fn encryption_needs_an_authenticated_peer_and_tcp() {
        let mut h = hello("r1:1", &[]);
        h.flags = h.flags.with(HelloFlags::ENCRYPT, true);
        let e = admit(&h, &policy(), &Peer::default()).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Unsupported);
        let authed = Peer { authenticated: true, ..Peer::default() };
        assert!(admit(&h, &policy(), &authed).unwrap().encrypt);
        h.transport = Transport::Rdma;
        assert_eq!(admit(&h, &policy(), &authed).unwrap_err().kind, ErrorKind::Unsupported);
        let plain = hello("r1:1", &[]);
        let e = admit(&plain, &Policy { require_encrypt: true, ..policy() }, &authed).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Unauthorized);
    }

    #[test]
    fn a_routed_push_names_this_nodes_own_entries() {
        let mut h = hello("r1:1", &["r2:2"]);
        h.wants = vec![Some(vec![1]), None];
        let a = admit(&h, &policy(), &Peer::default()).unwrap();
        let Subset { map, manifest: m } = a.own.expect("routed");
        assert_eq!(map, vec![None, Some(0)]);
        assert_eq!(m.entries().len(), 1);
        h.wants = vec![Some(vec![9])];
        assert_eq!(admit(&h, &policy(), &Peer::default()).unwrap_err().kind, ErrorKind::BadManifest);
    }

    #[test]
    fn granted_limits_hold_and_narrow() {
        let mut h = hello("r1:1", &[]);
        h.grant = Grant {
            origin: "k1".into(),
            limits: Some(Limits { names: vec!["other/".into()], replace_current: true, prune: false }),
        };
        let e = admit(&h, &policy(), &Peer::default()).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Unauthorized);
        assert!(e.message.contains("key k1 may not push 'ckpt'"), "{e}");
        h.grant.limits = Some(Limits { names: vec!["ck".into()], replace_current: true, prune: false });
        let a = admit(&h, &policy(), &Peer::default()).unwrap();
        assert_eq!(a.origin, "k1");
        assert_eq!(a.limits, h.grant.limits);
        h.keep = 2;
        assert!(admit(&h, &policy(), &Peer::default()).unwrap_err().message.contains("may not prune"));
    }

    #[test]
    fn a_version_far_ahead_of_current_is_refused() {
        let h = hello("r1:1", &[]);
        let near = Peer { current_version: Some(1), ..Peer::default() };
        assert!(admit(&h, &policy(), &near).is_ok());
        let e = admit(&h, &Policy { max_version_ahead: 3, ..policy() }, &near).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Unauthorized);
        assert!(admit(&h, &Policy { max_version_ahead: 0, ..policy() }, &near).is_ok(), "0: no limit");
    }
}
