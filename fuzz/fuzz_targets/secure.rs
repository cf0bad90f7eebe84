//! What issue 14 added to the wire: HELLO's grant (the pusher's key and limits, which every
//! replica narrows, never widens) and the MACs of data-plane frames on authenticated hops.
//!
//! The input drives both: as a HELLO payload (what decodes must re-encode to the same grant, and
//! intersecting its limits with themselves or with none changes nothing), and as a secret, a
//! header, a payload and a position: a frame signed by one end verifies at the other, and the
//! same frame with the chosen bit flipped, or a MAC made of the input's own bytes, does not.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shardcast::crypt::{FRAME_MAC_LEN, FrameMacs, SessionSecret};
use shardcast::wire::{HEADER_LEN, Hello, Limits};

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
