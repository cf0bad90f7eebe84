//! Property tests of the wire formats a peer's bytes reach: every encoder's output decodes to the
//! value encoded (headers, HELLO, manifests and plans, reports, status, transport, credits), and
//! the manifest decoders refuse garbage without panicking.
//!
//! `write_fuzz_seeds` (ignored) regenerates the seed corpora of the fuzz targets under
//! `fuzz/corpus/` from the same encoders: `cargo test --test proptest_wire -- --ignored`.

use std::collections::HashSet;

use proptest::prelude::*;
use shardcast::error::{ErrorKind, NodeError};
use shardcast::manifest::{Entry, EntryKind, Manifest, check_path};
use shardcast::transport::Transport;
use shardcast::wire::{
    self, HEADER_LEN, Header, Hello, HelloFlags, Kind, MAX_CHUNK, MAX_STR, MIN_CHUNK, Mode, Outcome, ReplicaReport,
    SetStatus, TransportMsg,
};

const KINDS: [Kind; 11] = [
    Kind::Hello,
    Kind::Accept,
    Kind::Reject,
    Kind::Chunk,
    Kind::End,
    Kind::Ack,
    Kind::Result,
    Kind::StatusReq,
    Kind::StatusResp,
    Kind::Transport,
    Kind::Credit,
];

const ERROR_KINDS: [ErrorKind; 15] = [
    ErrorKind::Unreachable,
    ErrorKind::VersionExists,
    ErrorKind::Busy,
    ErrorKind::DiskFull,
    ErrorKind::DigestMismatch,
    ErrorKind::ConnectionLost,
    ErrorKind::Protocol,
    ErrorKind::Io,
    ErrorKind::BadManifest,
    ErrorKind::Source,
    ErrorKind::Stalled,
    ErrorKind::Aborted,
    ErrorKind::Unsupported,
    ErrorKind::Unauthorized,
    ErrorKind::InvalidArgument,
];

fn header() -> impl Strategy<Value = Header> {
    prop::sample::select(&KINDS[..]).prop_flat_map(|kind| {
        (0..=kind.max_len(), any::<u64>(), any::<u128>()).prop_map(move |(len, seq, digest)| Header {
            kind,
            len,
            seq,
            digest,
        })
    })
}

/// A path component: never empty, `.` or `..` (it does not start with a dot), never `/` or NUL.
fn component() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9_\\-éß日本 ][a-zA-Z0-9_.\\-éß日本 ]{0,11}"
}

/// One entry to be placed: which listed directory it goes under (or the root), its name, whether
/// it is a directory, its size in chunks and a remainder, its mode.
type RawEntry = (prop::sample::Index, String, bool, u8, u16, u32);

/// Lays raw entries out as a tree, every directory listed before what it holds, no duplicates.
fn layout(raw: Vec<RawEntry>, chunk_size: u32) -> Vec<Entry> {
    let mut dirs: Vec<String> = Vec::new();
    let mut seen = HashSet::new();
    let mut entries = Vec::new();
    for (parent, name, is_dir, chunks, rest, mode) in raw {
        let slot = parent.index(dirs.len() + 1);
        let path = if slot == dirs.len() { name } else { format!("{}/{name}", dirs[slot]) };
        if path.len() > MAX_STR || !seen.insert(path.clone()) {
            continue;
        }
        let (kind, size) = if is_dir {
            dirs.push(path.clone());
            (EntryKind::Dir, 0)
        } else {
            // Up to 3 whole chunks plus a remainder below one chunk (empty files too).
            let size = u64::from(chunks % 4) * u64::from(chunk_size) + u64::from(rest) % u64::from(chunk_size);
            (EntryKind::File, size)
        };
        // Only permission bits: setuid, setgid and sticky are refused (never published).
        entries.push(Entry { path, kind, mode: mode & 0o777, size, first_chunk: 0 });
    }
    entries
}

/// A valid manifest: chunk size in bounds, a tree of entries, arbitrary digests.
fn manifest() -> impl Strategy<Value = Manifest> {
    let chunk_size = prop_oneof![Just(MIN_CHUNK), Just(MAX_CHUNK), MIN_CHUNK..=MAX_CHUNK];
    let raw = prop::collection::vec(
        (any::<prop::sample::Index>(), component(), any::<bool>(), any::<u8>(), any::<u16>(), any::<u32>()),
        0..12,
    );
    (chunk_size, raw, any::<u128>()).prop_map(|(chunk_size, raw, seed)| {
        let entries = layout(raw, chunk_size);
        let chunks: u64 = entries.iter().map(|e| e.size.div_ceil(u64::from(chunk_size))).sum();
        let digests = (0..u128::from(chunks)).map(|i| seed.wrapping_mul(i + 1) ^ i).collect();
        Manifest::new(chunk_size, entries, digests).expect("generated manifests are valid")
    })
}

fn transport() -> impl Strategy<Value = Transport> {
    prop::sample::select(&[Transport::Auto, Transport::Tcp, Transport::Rdma][..])
}

fn hello() -> impl Strategy<Value = Hello> {
    (
        prop_oneof!["[a-zA-Z0-9._-]{1,64}", ".{0,40}"],
        any::<u64>(),
        transport(),
        any::<u32>(),
        "[a-z0-9.:\\[\\]-]{0,40}",
        prop::collection::vec(prop_oneof!["[a-z0-9.:-]{1,40}", ".{0,20}"], 0..8),
        manifest(),
        any::<bool>(),
        any::<u64>(),
        0u8..4,
    )
        .prop_map(|(name, version, transport, keep, you, downstream, manifest, routed, seed, flags)| {
            // An ordinary push carries a plan (digests zero); a routed one the whole manifest and
            // each node's wanted entries (None: all).
            let (manifest, wants) = if routed {
                let entries = manifest.entries().len() as u32;
                let wants = (0..=downstream.len() as u32)
                    .map(|k| {
                        (seed.rotate_left(k) & 1 == 1)
                            .then(|| (0..entries).filter(|i| seed.rotate_left(i + k) & 2 == 2).collect())
                    })
                    .collect();
                (manifest, wants)
            } else {
                (Manifest::decode_plan(&manifest.encode_plan()).expect("a plan decodes"), Vec::new())
            };
            Hello {
                name,
                version,
                mode: Mode::Sync,
                transport,
                keep,
                flags: HelloFlags(flags),
                you,
                downstream,
                manifest,
                wants,
                grant: Default::default(),
                lanes: 1,
            }
        })
}

fn reports() -> impl Strategy<Value = Vec<ReplicaReport>> {
    let outcome = prop_oneof![
        Just(Outcome::Published),
        (prop::sample::select(&ERROR_KINDS[..]), ".{0,60}").prop_map(|(k, m)| Outcome::Failed(NodeError::new(k, m))),
    ];
    prop::collection::vec(
        ("[a-z0-9.:]{0,30}", outcome).prop_map(|(node, outcome)| ReplicaReport { node, outcome }),
        0..8,
    )
}

fn status() -> impl Strategy<Value = Vec<SetStatus>> {
    prop::collection::vec(
        (
            ".{0,30}",
            any::<Option<u64>>(),
            prop::collection::vec(any::<u64>(), 0..6),
            prop::collection::vec(any::<(u64, u64, u64)>(), 0..3),
        )
            .prop_map(|(name, current, versions, receiving)| SetStatus { name, current, versions, receiving }),
        0..6,
    )
}

fn credit() -> impl Strategy<Value = wire::Credit> {
    any::<(u16, u32)>().prop_map(|(slot, rkey)| wire::Credit { slot, rkey })
}

fn transport_msg() -> impl Strategy<Value = TransportMsg> {
    prop_oneof![
        ".{0,60}".prop_map(|reason| TransportMsg::Tcp { reason }),
        ("[a-z0-9_]{0,16}", any::<(u32, u32, [u8; 16], u8, u64, u32)>(), prop::collection::vec(credit(), 0..64))
            .prop_map(|(device, (qpn, psn, gid, mtu, addr, slot_size), credits)| TransportMsg::Rdma {
                device,
                qpn,
                psn,
                gid,
                mtu,
                addr,
                slot_size,
                credits,
            }),
    ]
}

/// A valid encoding with damage: truncated, a byte overwritten, bytes inserted.
fn damaged(encoding: Vec<u8>, at: prop::sample::Index, how: u8, byte: u8) -> Vec<u8> {
    let mut b = encoding;
    let i = at.index(b.len() + 1);
    match how % 3 {
        0 => b.truncate(i),
        1 if i < b.len() => b[i] = byte,
        _ => b.insert(i, byte),
    }
    b
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn header_round_trip(h in header()) {
        let bytes = h.to_bytes();
        prop_assert_eq!(bytes.len(), HEADER_LEN);
        prop_assert_eq!(Header::decode(&bytes), Ok(h));
    }

    #[test]
    fn header_longer_than_its_kind_is_refused(h in header(), extra in 1..=u32::MAX) {
        let mut bytes = h.to_bytes();
        let len = h.kind.max_len().saturating_add(extra);
        prop_assume!(len > h.kind.max_len());
        bytes[8..12].copy_from_slice(&len.to_le_bytes());
        prop_assert!(Header::decode(&bytes).is_err());
    }

    #[test]
    fn hello_round_trip(h in hello()) {
        let back = Hello::decode(&h.encode()).expect("an encoded HELLO decodes");
        prop_assert_eq!(back, h);
    }

    #[test]
    fn hello_frame_round_trip(h in hello(), seq in any::<u64>()) {
        let mut conn = Vec::new();
        wire::write_frame(&mut conn, Kind::Hello, seq, &h.encode()).unwrap();
        let frame = wire::read_frame(&mut &conn[..]).expect("a written frame reads back");
        prop_assert_eq!(frame.header.kind, Kind::Hello);
        prop_assert_eq!(frame.header.seq, seq);
        prop_assert_eq!(Hello::decode(&frame.payload).unwrap(), h);
    }

    #[test]
    fn manifest_round_trip(m in manifest()) {
        for e in m.entries() {
            prop_assert!(check_path(&e.path).is_ok());
        }
        prop_assert_eq!(&Manifest::decode(&m.encode()).expect("an encoded manifest decodes"), &m);
        // The plan drops the digests; filled in again it is the manifest.
        let mut plan = Manifest::decode_plan(&m.encode_plan()).expect("an encoded plan decodes");
        prop_assert_eq!(plan.entries(), m.entries());
        prop_assert_eq!(plan.chunk_count(), m.chunk_count());
        for seq in 0..m.chunk_count() {
            plan.set_digest(seq, m.chunk(seq).unwrap().digest);
        }
        prop_assert_eq!(plan.digest(), m.digest());
        prop_assert_eq!(plan, m);
    }

    #[test]
    fn manifest_decode_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..1024)) {
        let _ = Manifest::decode(&bytes);
        let _ = Manifest::decode_plan(&bytes);
    }

    #[test]
    fn damaged_manifest_decodes_safely(
        m in manifest(),
        plan in any::<bool>(),
        at in any::<prop::sample::Index>(),
        how in any::<u8>(),
        byte in any::<u8>(),
    ) {
        let encoding = if plan { m.encode_plan() } else { m.encode() };
        let bytes = damaged(encoding, at, how, byte);
        let decoded = if plan { Manifest::decode_plan(&bytes) } else { Manifest::decode(&bytes) };
        // Damage may still decode (a size or a digest changed); what decodes is still safe.
        if let Ok(d) = decoded {
            for e in d.entries() {
                prop_assert!(check_path(&e.path).is_ok());
            }
        }
    }

    #[test]
    fn damaged_hello_decodes_safely(
        h in hello(),
        at in any::<prop::sample::Index>(),
        how in any::<u8>(),
        byte in any::<u8>(),
    ) {
        if let Ok(d) = Hello::decode(&damaged(h.encode(), at, how, byte)) {
            prop_assert_eq!(Hello::decode(&d.encode()).unwrap(), d);
        }
    }

    #[test]
    fn reports_round_trip(r in reports()) {
        prop_assert_eq!(wire::decode_reports(&wire::encode_reports(&r)).unwrap(), r);
    }

    #[test]
    fn status_round_trip(s in status()) {
        prop_assert_eq!(wire::decode_status(&wire::encode_status(&s)).unwrap(), s);
    }

    #[test]
    fn transport_round_trip(t in transport_msg()) {
        prop_assert_eq!(TransportMsg::decode(&t.encode()).unwrap(), t);
    }

    #[test]
    fn credits_round_trip(credits in prop::collection::vec(credit(), 0..512)) {
        let mut b = Vec::new();
        wire::encode_credits(&credits, &mut b);
        prop_assert_eq!(b.len(), credits.len() * wire::CREDIT_LEN);
        prop_assert_eq!(wire::decode_credits(&b).unwrap(), credits);
    }

    #[test]
    fn haves_round_trip_and_stay_in_range(
        haves in prop::collection::vec(prop::collection::vec((0u64..1000, 0u64..1000), 0..20), 0..6),
    ) {
        let b = wire::encode_haves(&haves);
        prop_assert_eq!(wire::decode_haves(&b, 2000).unwrap(), haves.clone());
        let past = haves.iter().flatten().any(|&(s, l)| s + l > 1500);
        prop_assert_eq!(wire::decode_haves(&b, 1500).is_err(), past);
    }
}

/// Writes the seed corpora of the fuzz targets (`fuzz/corpus/<target>/`): real encodings of
/// every frame kind, HELLOs, manifests and plans. Deterministic, so rerunning it changes nothing.
#[test]
#[ignore = "writes fuzz/corpus/; run on purpose to regenerate the seeds"]
fn write_fuzz_seeds() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    let entry = |path: &str, kind, size| Entry { path: path.into(), kind, mode: 0o644, size, first_chunk: 0 };
    let cs = MIN_CHUNK;
    let entries = vec![
        entry("model", EntryKind::Dir, 0),
        entry("model/config.json", EntryKind::File, 300),
        entry("model/shards", EntryKind::Dir, 0),
        entry("model/shards/00.safetensors", EntryKind::File, u64::from(cs) * 2 + 5),
        entry("empty", EntryKind::File, 0),
    ];
    let full = Manifest::new(cs, entries, vec![0x1111, 0x2222, 0x3333, 0x4444]).unwrap();
    let single = Manifest::new(4 << 20, vec![entry("weights.bin", EntryKind::File, 10)], vec![7]).unwrap();
    let plan = Manifest::decode_plan(&full.encode_plan()).unwrap();
    let hello = Hello {
        name: "llama-7b".into(),
        version: 42,
        mode: Mode::Sync,
        transport: Transport::Auto,
        keep: 3,
        flags: HelloFlags::default(),
        you: "10.0.0.2:7070".into(),
        downstream: vec!["10.0.0.3:7070".into(), "10.0.0.4:7070".into()],
        manifest: plan,
        wants: Vec::new(),
        grant: Default::default(),
        lanes: 1,
    };
    let tiny_hello = Hello {
        name: "s".into(),
        version: 1,
        mode: Mode::Sync,
        transport: Transport::Tcp,
        keep: 0,
        flags: HelloFlags::default(),
        you: String::new(),
        downstream: Vec::new(),
        manifest: Manifest::new(cs, Vec::new(), Vec::new()).unwrap(),
        wants: Vec::new(),
        grant: Default::default(),
        lanes: 1,
    };
    let reports = vec![
        ReplicaReport { node: "10.0.0.3:7070".into(), outcome: Outcome::Published },
        ReplicaReport::failed("10.0.0.4:7070", NodeError::new(ErrorKind::DiskFull, "not enough free space")),
    ];
    let status = vec![SetStatus {
        name: "llama-7b".into(),
        current: Some(42),
        versions: vec![41, 42],
        receiving: vec![(43, 1 << 30, 4 << 30)],
    }];
    let rdma = TransportMsg::Rdma {
        device: "mlx5_0".into(),
        qpn: 17,
        psn: 0x12_3456,
        gid: [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0, 0, 2],
        mtu: 5,
        addr: 0x7f00_0000_1000,
        slot_size: (4 << 20) + 4096,
        credits: (0..4).map(|slot| wire::Credit { slot, rkey: 0x1700 + u32::from(slot) }).collect(),
    };
    let mut credits = Vec::new();
    let keys = [(0, 0x201), (1, 0x302), (7, 0x9ff)];
    wire::encode_credits(&keys.map(|(slot, rkey)| wire::Credit { slot, rkey }), &mut credits);
    let granted = Hello {
        grant: wire::Grant {
            origin: "0123456789abcdef".into(),
            limits: Some(wire::Limits {
                names: vec!["ckpt-".into(), "llm-".into()],
                replace_current: false,
                prune: false,
            }),
        },
        ..hello.clone()
    };
    // The `secure` target's MAC input: a secret, a CHUNK header, a bit position, a payload.
    let mut mac_seed = vec![7u8; 32];
    mac_seed.extend_from_slice(&Header { kind: Kind::Chunk, len: 5, seq: 3, digest: 0x4444 }.to_bytes());
    mac_seed.push(200);
    mac_seed.extend_from_slice(&[0x5a; 24]);

    let frame = |kind, seq, payload: &[u8]| {
        let mut b = Vec::new();
        wire::write_frame(&mut b, kind, seq, payload).unwrap();
        b
    };
    let mut chunk_header = Header { kind: Kind::Chunk, len: 5, seq: 3, digest: 0x4444 }.to_bytes().to_vec();
    chunk_header.extend_from_slice(b"bytes");
    let seeds: Vec<(&str, &str, Vec<u8>)> = vec![
        ("frame", "hello", frame(Kind::Hello, 0, &hello.encode())),
        ("frame", "accept", frame(Kind::Accept, 0, &[])),
        ("frame", "reject", frame(Kind::Reject, 0, &wire::encode_reports(&reports[1..]))),
        ("frame", "chunk", chunk_header),
        ("frame", "end", frame(Kind::End, 4, &[])),
        ("frame", "ack", frame(Kind::Ack, 4, &[])),
        ("frame", "result", frame(Kind::Result, 0, &wire::encode_reports(&reports))),
        ("frame", "status_req", frame(Kind::StatusReq, 0, &[])),
        ("frame", "status_resp", frame(Kind::StatusResp, 0, &wire::encode_status(&status))),
        ("frame", "transport_tcp", frame(Kind::Transport, 0, &TransportMsg::Tcp { reason: "no RNIC".into() }.encode())),
        ("frame", "transport_rdma", frame(Kind::Transport, 0, &rdma.encode())),
        ("frame", "credit", frame(Kind::Credit, 0, &credits)),
        ("handshake", "hello", hello.encode()),
        ("handshake", "hello_tiny", tiny_hello.encode()),
        ("manifest", "manifest", full.encode()),
        ("manifest", "manifest_single", single.encode()),
        ("manifest", "plan", full.encode_plan()),
        ("secure", "hello_grant", granted.encode()),
        ("secure", "frame_mac", mac_seed),
    ];
    for (target, name, bytes) in seeds {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("{name}.bin")), bytes).unwrap();
    }
}
