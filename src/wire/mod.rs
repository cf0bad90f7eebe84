//! Frame formats, versioned, with explicit and bounded lengths.
//!
//! Every frame is a [`HEADER_LEN`]-byte [`Header`] followed by `len` payload bytes (layout in
//! ARCHITECTURE.md). Payloads are encoded with [`Enc`] and decoded with [`Dec`], which checks
//! every length against what is left before it reads, so garbage yields a [`WireError`], never a
//! panic or an unbounded allocation.

pub(crate) mod codec;
pub(crate) mod frame;
mod hello;
mod messages;

pub use codec::*;
pub use frame::*;
pub use hello::*;
pub use messages::*;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{ErrorKind, NodeError, WireError};
    use proptest::prelude::*;

    #[test]
    fn header_round_trip() {
        let h = Header { kind: Kind::Chunk, len: 4096, seq: 7, digest: 0xdead_beef };
        assert_eq!(Header::decode(&h.to_bytes()).unwrap(), h);
    }

    #[test]
    fn accept_carries_bases_only_on_a_delta_push() {
        let haves = vec![vec![(0, 2)], vec![]];
        let bases = vec![vec![(3, 7u128 << 100)], vec![(3, 9), (4, 1)]];
        let b = encode_accept(&haves, Some(&bases));
        assert_eq!(decode_accept(&b, 5, true).unwrap(), (haves.clone(), bases.clone()));
        assert!(decode_accept(&b, 5, false).is_err(), "bases where none were asked for");
        assert!(decode_accept(&b, 4, true).is_err(), "a base past the chunks");
        assert!(decode_accept(&b[..b.len() - 1], 5, true).is_err());
        let plain = encode_accept(&haves, None);
        assert_eq!(plain, encode_haves(&haves));
        assert_eq!(decode_accept(&plain, 5, false).unwrap(), (haves.clone(), Vec::new()));
        assert!(decode_accept(&plain, 5, true).is_err(), "a delta push's ACCEPT without bases");
        let short = encode_accept(&haves, Some(&bases[..1].to_vec()));
        assert!(decode_accept(&short, 5, true).is_err(), "bases for fewer nodes than have-sets");
    }

    #[test]
    fn header_rejects_garbage() {
        let mut b = Header::new(Kind::Ack).to_bytes();
        b[0] = b'X';
        assert!(matches!(Header::decode(&b), Err(WireError::BadMagic(_))));
        let mut b = Header::new(Kind::Ack).to_bytes();
        b[6] = 200;
        assert_eq!(Header::decode(&b), Err(WireError::UnknownKind(200)));
        let mut b = Header::new(Kind::Ack).to_bytes();
        b[8..12].copy_from_slice(&1u32.to_le_bytes());
        assert!(matches!(Header::decode(&b), Err(WireError::TooLong { .. })));
        let mut b = Header::new(Kind::Hello).to_bytes();
        b[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(Header::decode(&b), Err(WireError::TooLong { .. })));
    }

    #[test]
    fn an_older_version_is_refused_naming_both_versions() {
        let mut b = Header::new(Kind::Hello).to_bytes();
        b[4..6].copy_from_slice(&4u16.to_le_bytes());
        let e = Header::decode(&b).unwrap_err();
        assert_eq!(e, WireError::BadVersion(4));
        let msg = e.to_string();
        assert!(msg.contains("version 4") && msg.contains(&format!("speaks {PROTO_VERSION}")), "{msg}");
    }

    #[test]
    fn grants_round_trip_in_hello_and_limits_intersect() {
        let lim = |names: &[&str], rc, prune| Limits {
            names: names.iter().map(|n| (*n).to_owned()).collect(),
            replace_current: rc,
            prune,
        };
        let a = lim(&["ckpt-", "llm-"], true, false);
        let b = lim(&["ckpt-big", "data"], false, true);
        let both = Limits::intersect(Some(&a), Some(&b)).unwrap();
        assert_eq!(both, lim(&["ckpt-big"], false, false));
        assert!(both.allows("ckpt-big-1") && !both.allows("ckpt-small") && !both.allows("data-1"));
        assert_eq!(Limits::intersect(None, Some(&a)), Some(a.clone()));
        assert_eq!(Limits::intersect(None, None), None);
        let any = lim(&[""], true, true);
        assert_eq!(Limits::intersect(Some(&any), Some(&a)).unwrap().names, a.names);

        let (m, _) = crate::manifest::Manifest::plan_for_files(1 << 20, &[("a.bin", 3 << 20)]).unwrap();
        for grant in [Grant::default(), Grant { origin: "0123abcd".into(), limits: Some(both) }] {
            let h = Hello {
                name: "ckpt-big-1".into(),
                version: 3,
                mode: Mode::Sync,
                transport: crate::transport::Transport::Tcp,
                keep: 0,
                flags: HelloFlags::default(),
                you: "a:1".into(),
                downstream: vec!["b:2".into()],
                manifest: m.clone(),
                wants: Vec::new(),
                grant,
                lanes: 1,
            };
            assert_eq!(Hello::decode(&h.encode()).unwrap(), h);
            // Several lanes: the flag and the count travel; one lane encodes as it always did.
            let laned = Hello { flags: HelloFlags::default().with(HelloFlags::LANES, true), lanes: 3, ..h.clone() };
            assert_eq!(Hello::decode(&laned.encode()).unwrap(), laned);
            assert_eq!(laned.encode().len(), h.encode().len() + 1);
        }
    }

    #[test]
    fn a_lane_offer_splits_off_accept_with_its_rails_and_one_lane_leaves_accept_as_it_is() {
        let haves = encode_accept(&[vec![(0, 3)]], None);
        let rails: Vec<std::net::SocketAddr> = vec![
            "10.77.0.2:7071".parse().unwrap(),
            "[fd00::7]:7071".parse().unwrap(),
            "10.77.1.2:7071".parse().unwrap(),
        ];
        for rails in [Vec::new(), rails] {
            let offer = LaneOffer { token: [7; LANE_TOKEN_LEN], rails };
            let mut payload = haves.clone();
            payload.extend(offer.encode());
            assert_eq!(split_lane_token(payload.clone(), 2), Some((haves.clone(), Some(offer))));
            // One lane: ACCEPT is what it always was, nothing split off.
            assert_eq!(split_lane_token(payload.clone(), 1), Some((payload, None)));
        }
        // Too short for the rails it counts, or more rails than allowed: refused.
        assert_eq!(split_lane_token(vec![1; LANE_TOKEN_LEN + 1], 2), None);
        assert_eq!(split_lane_token(vec![(MAX_RAILS + 1) as u8; 1000], 2), None);
    }

    #[test]
    fn transport_messages_round_trip() {
        let msgs = [
            TransportMsg::Tcp { reason: "no RDMA device".into() },
            TransportMsg::Rdma {
                device: "rxe_v0".into(),
                qpn: 17,
                psn: 0x12_3456,
                gid: [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 198, 18, 1, 1],
                mtu: 5,
                addr: 0x7f00_0000_1000,
                slot_size: (4 << 20) + 4096,
                credits: [0, 1, 2, 65535].map(|slot| Credit { slot, rkey: 0x0a00 + u32::from(slot) }).to_vec(),
            },
        ];
        for m in msgs {
            assert_eq!(TransportMsg::decode(&m.encode()).unwrap(), m);
        }
        let mut b = Vec::new();
        let credits = [(3, 0x1_0001), (9, u32::MAX), (400, 0)].map(|(slot, rkey)| Credit { slot, rkey });
        encode_credits(&credits, &mut b);
        assert_eq!(b.len(), 3 * CREDIT_LEN);
        assert_eq!(decode_credits(&b).unwrap(), credits);
        assert!(decode_credits(&[1]).is_err());
        assert!(decode_credits(&[0; 4]).is_err(), "a slot without its key");
    }

    #[test]
    fn hostile_counts_do_not_allocate() {
        let mut e = Enc::default();
        e.u64(u64::MAX / 2);
        assert!(decode_reports(&e.0).is_err());
        assert!(decode_status(&e.0).is_err());
    }

    proptest! {
        #[test]
        fn reports_round_trip(nodes in proptest::collection::vec(("[a-z0-9.:]{0,30}", any::<bool>(), ".{0,60}"), 0..8)) {
            let reports: Vec<ReplicaReport> = nodes.into_iter().map(|(node, ok, msg)| ReplicaReport {
                node,
                outcome: if ok { Outcome::Published } else { Outcome::Failed(NodeError::new(ErrorKind::DiskFull, msg)) },
            }).collect();
            prop_assert_eq!(decode_reports(&encode_reports(&reports)).unwrap(), reports);
        }

        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_reports(&bytes);
            let _ = decode_status(&bytes);
            let _ = Hello::decode(&bytes);
            let _ = TransportMsg::decode(&bytes);
            let _ = decode_credits(&bytes);
            let _ = decode_accept(&bytes, 1 << 20, true);
            if bytes.len() >= HEADER_LEN {
                let _ = Header::decode(bytes[..HEADER_LEN].try_into().unwrap());
            }
        }
    }
}
