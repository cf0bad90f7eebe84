//! The frames an authenticated connection sends after its handshake that decide something
//! (REJECT: why a push was refused; TRANSPORT: which link a hop takes; STATUS_RESP: what a
//! replica holds) carry the connection's MAC: real `serve`, `push` and `status` processes, with
//! a proxy in front of a keyed replica that rewrites one such frame coming back from it (into
//! one that still decodes, its MAC, if any, kept). Each rewrite is refused as unauthentic;
//! nothing forged is shown or believed.

mod util;

use std::io::{BufReader, Read, Write};
use std::net::{Shutdown, TcpStream};

use shardcast::wire::{self, HEADER_LEN, Kind, MAGIC, Outcome, TransportMsg};
use util::*;

const SECRET: &str = "correct-horse-battery-staple-0123456789abcdef";
const OTHER: &str = "another-cluster-entirely-0123456789abcdef0000";

/// Bytes of the MAC a control frame carries after its payload on an authenticated connection.
const MAC: usize = shardcast::crypt::MAC_LEN;

/// Splits `payload` into what `decodes` accepts and the bytes after it: the whole payload (no
/// MAC), or all but its last [`MAC`] bytes.
fn split_mac(payload: &[u8], decodes: impl Fn(&[u8]) -> bool) -> (Vec<u8>, Vec<u8>) {
    if decodes(payload) || payload.len() < MAC {
        return (payload.to_vec(), Vec::new());
    }
    let (body, mac) = payload.split_at(payload.len() - MAC);
    assert!(decodes(body), "neither the payload nor all but its MAC decode");
    (body.to_vec(), mac.to_vec())
}

fn copy(mut from: impl Read, mut to: TcpStream) {
    let mut buf = vec![0u8; 64 << 10];
    while let Ok(n) = from.read(&mut buf) {
        if n == 0 || to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

/// A proxy in front of `target`. On its first connection, the first frame of `kind` coming
/// back from `target` has its payload replaced by `rewrite(payload)` (the header's length
/// follows); everything else, and every later connection, passes unchanged.
fn rewriting_proxy(target: String, kind: Kind, rewrite: fn(&[u8]) -> Vec<u8>) -> String {
    proxy(target, move |first, client, server| {
        let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
        std::thread::spawn(move || copy(client, server));
        if !first {
            std::thread::spawn(move || copy(s2, c2));
            return;
        }
        std::thread::spawn(move || {
            let mut from = BufReader::with_capacity(1 << 20, s2);
            let mut to = c2;
            let mut header = [0u8; HEADER_LEN];
            // Frame by frame until the one to rewrite (the frames before it are the
            // handshake's: AUTH, ACCEPT, the first TRANSPORT), then as it comes.
            while from.read_exact(&mut header).is_ok() {
                assert_eq!(header[..4], MAGIC, "lost the frame boundaries");
                let len = u32::from_le_bytes(header[8..12].try_into().unwrap()) as usize;
                let mut payload = vec![0u8; len];
                if from.read_exact(&mut payload).is_err() {
                    return;
                }
                let hit = header[6] == kind as u8;
                if hit {
                    payload = rewrite(&payload);
                    header[8..12].copy_from_slice(&(payload.len() as u32).to_le_bytes());
                }
                if to.write_all(&header).and_then(|()| to.write_all(&payload)).is_err() {
                    return;
                }
                if hit {
                    break;
                }
            }
            let rest = from.buffer().to_vec();
            if to.write_all(&rest).is_ok() {
                copy(from.into_inner(), to);
            }
        });
    })
}

/// A REJECT's reports with every failure's reason replaced (the same kind of error).
fn forge_reject_reason(payload: &[u8]) -> Vec<u8> {
    let (body, mac) = split_mac(payload, |b| wire::decode_reports(b).is_ok());
    let mut reports = wire::decode_reports(&body).unwrap();
    for r in &mut reports {
        if let Outcome::Failed(e) = &mut r.outcome {
            e.message = "forged reason: reinstall the replica".into();
        }
    }
    let mut out = wire::encode_reports(&reports);
    out.extend_from_slice(&mac);
    out
}

/// A TRANSPORT answer turned into an RDMA one (a queue pair nobody opened).
fn forge_transport_choice(payload: &[u8]) -> Vec<u8> {
    let (body, mac) = split_mac(payload, |b| TransportMsg::decode(b).is_ok());
    assert!(matches!(TransportMsg::decode(&body), Ok(TransportMsg::Tcp { .. })), "no RDMA here: a TCP answer");
    let mut out = TransportMsg::Rdma {
        device: "forged0".into(),
        qpn: 17,
        psn: 1,
        gid: [0; 16],
        mtu: 3,
        addr: 0x10_0000,
        slot_size: 4 << 20,
        credits: vec![wire::Credit { slot: 0, rkey: 0x1234 }, wire::Credit { slot: 1, rkey: 0x1235 }],
    }
    .encode();
    out.extend_from_slice(&mac);
    out
}

/// A STATUS_RESP whose sets all say their current version is 999.
fn forge_status(payload: &[u8]) -> Vec<u8> {
    let (body, mac) = split_mac(payload, |b| wire::decode_status(b).is_ok());
    let mut sets = wire::decode_status(&body).unwrap();
    assert!(!sets.is_empty(), "the replica holds a set");
    for s in &mut sets {
        s.current = Some(999);
        s.versions.push(999);
    }
    let mut out = wire::encode_status(&sets);
    out.extend_from_slice(&mac);
    out
}

/// A REJECT (an ACL refusal, after the key was proved) whose reason is changed on the way back:
/// the push reports that the REJECT does not authenticate, never the forged reason; the same
/// push straight to the replica shows the real one.
#[test]
fn a_reject_with_a_changed_reason_is_not_believed() {
    let t = tempdir();
    let admin = key_file(t.path(), "admin.key", SECRET);
    let trainer = key_file(t.path(), "trainer.key", OTHER);
    let c = acl_cluster(1, &admin, t.path(), "[[key]]\nfile = \"trainer.key\"\nnames = [\"ckpt-\"]\n");
    let src = t.path().join("src");
    write_random_file(&src.join("w.bin"), 1 << 20, 3);
    let proxy = rewriting_proxy(c.addr(0), Kind::Reject, forge_reject_reason);
    let push = |to: &str| {
        let mut cmd = c.push_cmd(to, &src, "other", 1, &["--json"]);
        cmd.arg("--key-file").arg(&trainer);
        run(&mut cmd)
    };
    let out = push(&proxy);
    let all = all_output(&out);
    assert_ne!(code(&out), 0, "{all}");
    assert!(!all.contains("forged reason"), "the forged reason was shown:\n{all}");
    assert!(all.contains("REJECT") && all.contains("does not authenticate"), "{all}\n{}", c.logs());
    assert!(!c.root(0).join("other").exists());
    // Straight to the replica: the real reason.
    let out = push(&c.addr(0));
    assert_eq!(code(&out), 1, "{}", show_output(&out));
    assert!(all_output(&out).contains("may not push 'other'"), "{}", show_output(&out));
}

/// The replica's TRANSPORT answer turned from TCP into RDMA on the way back: the push refuses it
/// as unauthentic instead of taking the link it names; a push without the proxy works.
#[test]
fn a_transport_answer_changed_in_transit_is_refused() {
    let (_t, c, src) = keyed_source(1, SECRET, 1 << 20, 4);
    let proxy = rewriting_proxy(c.addr(0), Kind::Transport, forge_transport_choice);
    let out = run(&mut c.push_cmd(&proxy, &src, "t", 1, &["--json", "--transport", "auto"]));
    let all = all_output(&out);
    assert_ne!(code(&out), 0, "a forged TRANSPORT answer was taken:\n{all}\n{}", c.logs());
    assert!(all.contains("TRANSPORT") && all.contains("does not authenticate"), "{all}\n{}", c.logs());
    assert!(!c.root(0).join("t/1").exists());
    let out = run(&mut c.push_cmd(&c.addr(0), &src, "t", 2, &["--json", "--transport", "auto"]));
    c.assert_push_ok(&out);
    c.assert_published(&src, "t", 2);
}

/// A STATUS_RESP changed on the way back (every set's `current` made 999): `status` refuses it
/// as unauthentic and shows nothing forged; straight to the replica it shows the truth.
#[test]
fn a_status_answer_changed_in_transit_is_refused() {
    let (_t, c, src) = keyed_source(1, SECRET, 1 << 20, 5);
    c.assert_push_ok(&c.push(&src, "s", 1, &["--json"]));
    let proxy = rewriting_proxy(c.addr(0), Kind::StatusResp, forge_status);
    let out = run(c.cmd().arg("status").arg(&proxy).arg("--json"));
    let all = all_output(&out);
    assert_ne!(code(&out), 0, "a forged STATUS_RESP was shown:\n{all}");
    assert!(!all.contains("999"), "{all}");
    assert!(all.contains("STATUS_RESP") && all.contains("does not authenticate"), "{all}\n{}", c.logs());
    let st = c.status_json(0);
    assert_eq!(set_versions(status_set(&st, "s").expect("set s")), vec![1], "{st}");
}
