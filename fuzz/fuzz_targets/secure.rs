//! What issue 14 added to the wire: HELLO's grant (the pusher's key and limits, which every
//! replica narrows, never widens) and the MACs of data-plane frames on authenticated hops.
//!
//! The input drives both: as a HELLO payload (what decodes must re-encode to the same grant, and
//! intersecting its limits with themselves or with none changes nothing), and as a secret, a
//! header, a payload and a position: a frame signed by one end verifies at the other, and the
//! same frame with the chosen bit flipped, or a MAC made of the input's own bytes, does not.
//! The same input as the payload of each sealed control frame (REJECT, TRANSPORT, STATUS_RESP,
//! HELLO, ACCEPT, RESULT): sealed, it opens under its own label only, not once a bit is flipped;
//! unsealed, it never opens; and its decoder takes whatever opens without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shardcast::crypt::{self, FRAME_MAC_LEN, FrameMacs, SessionSecret};
use shardcast::wire::{self, HEADER_LEN, Hello, Limits, TransportMsg};

/// The sealed control frames' labels, each with its payload's decoder.
const SEALED: [(&[u8], fn(&[u8])); 7] = [
    (crypt::LABEL_REJECT, |b| drop(wire::decode_reports(b))),
    (crypt::LABEL_RESULT, |b| drop(wire::decode_reports(b))),
    (crypt::LABEL_STATUS, |b| drop(wire::decode_status(b))),
    (crypt::LABEL_TRANSPORT_OFFER, |b| drop(TransportMsg::decode(b))),
    (crypt::LABEL_TRANSPORT_ANSWER, |b| drop(TransportMsg::decode(b))),
    (crypt::LABEL_HELLO, |b| drop(Hello::decode(b))),
    (crypt::LABEL_ACCEPT, |b| drop(wire::decode_haves(b, 1 << 20))),
];

#[global_allocator]
static ALLOC: shardcast_fuzz::CappedAlloc = shardcast_fuzz::CappedAlloc;

fuzz_target!(|data: &[u8]| {
    if let Ok(hello) = Hello::decode(data) {
        let again = Hello::decode(&hello.encode()).expect("an encoded HELLO decodes");
        assert_eq!(again.grant, hello.grant, "the grant changed through encode/decode");
        if let Some(l) = &hello.grant.limits {
            let same = Limits::intersect(Some(l), None).expect("limits and none are the limits");
            assert_eq!(&same, l);
            let both = Limits::intersect(Some(l), Some(l)).expect("limits with themselves");
            assert_eq!((both.replace_current, both.prune), (l.replace_current, l.prune));
            for n in l.names.iter().chain(both.names.iter()) {
                assert_eq!(both.allows(n), l.allows(n), "intersecting with itself changed what {n:?} may do");
            }
        }
    }

    let Some((secret, rest)) = data.split_first_chunk::<32>() else { return };
    let Some((header, rest)) = rest.split_first_chunk::<HEADER_LEN>() else { return };
    let Some((&at, payload)) = rest.split_first() else { return };
    let s = SessionSecret::from_bytes(*secret);
    sealed_frames(&s, rest);
    let (mut tx, mut rx) = (FrameMacs::upstream_end(&s), FrameMacs::downstream_end(&s));
    let mac = tx.sign(header, payload);
    assert!(rx.verify(header, payload, &mac).is_ok(), "a frame signed by one end fails at the other");
    // The next frame, changed in one bit of its header (or its MAC), fails.
    let mac2 = tx.sign(header, payload);
    let mut h = *header;
    let bit = usize::from(at) % (HEADER_LEN * 8);
    h[bit / 8] ^= 1 << (bit % 8);
    let mut rx2 = FrameMacs::downstream_end(&s);
    rx2.verify(header, payload, &mac).expect("the first frame");
    assert!(rx2.verify(&h, payload, &mac2).is_err(), "a changed header verified");
    // A forged MAC from the input's own bytes fails (but for a 2^-128 chance).
    if let Some(forged) = payload.first_chunk::<FRAME_MAC_LEN>()
        && *forged != mac2
    {
        assert!(rx.verify(header, payload, forged).is_err(), "a forged MAC verified");
    }
});

/// `payload` sealed under each label opens under that label only, and no longer once the bit
/// `payload[0]` picks is flipped; unsealed, it does not open (but for a 2^-256 chance).
fn sealed_frames(s: &SessionSecret, payload: &[u8]) {
    for (i, (label, decode)) in SEALED.iter().enumerate() {
        let sealed = crypt::seal_frame(Some(s), label, payload.to_vec());
        let body = crypt::open_frame(Some(s), label, &sealed).expect("a sealed frame opens under its label");
        assert_eq!(body, payload);
        decode(body);
        let (other, _) = SEALED[(i + 1) % SEALED.len()];
        if other != *label {
            assert!(crypt::open_frame(Some(s), other, &sealed).is_err(), "a frame opened under another label");
        }
        let mut flipped = sealed.clone();
        let bit = usize::from(payload.first().copied().unwrap_or(0)) % (flipped.len() * 8);
        flipped[bit / 8] ^= 1 << (bit % 8);
        assert!(crypt::open_frame(Some(s), label, &flipped).is_err(), "a changed sealed frame opened");
        if let Ok(b) = crypt::open_frame(Some(s), label, payload) {
            panic!("an unsealed payload opened ({} bytes)", b.len());
        }
    }
}
