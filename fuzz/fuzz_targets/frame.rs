//! The frame decoder and every control payload decoder a peer's bytes reach.
//!
//! The input is what a peer sends on a connection: a 40-byte header, then the payload. The
//! payload decoders also run on the raw input, so they are fuzzed even by inputs whose header
//! does not decode. What decodes must re-encode to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shardcast::wire::{self, HEADER_LEN, Header, Kind};

#[global_allocator]
static ALLOC: shardcast_fuzz::CappedAlloc = shardcast_fuzz::CappedAlloc;

fn payloads(kind: Option<Kind>, payload: &[u8]) {
    // `None`: raw input, every decoder; `Some(kind)`: the decoder a frame of that kind reaches.
    let runs = |k: Kind| kind.is_none_or(|kind| kind == k);
    if (runs(Kind::Reject) || runs(Kind::Result))
        && let Ok(reports) = wire::decode_reports(payload)
    {
        assert_eq!(wire::decode_reports(&wire::encode_reports(&reports)).unwrap(), reports);
    }
    if runs(Kind::StatusResp)
        && let Ok(sets) = wire::decode_status(payload)
    {
        assert_eq!(wire::decode_status(&wire::encode_status(&sets)).unwrap(), sets);
    }
    if runs(Kind::Transport)
        && let Ok(msg) = wire::TransportMsg::decode(payload)
    {
        assert_eq!(wire::TransportMsg::decode(&msg.encode()).unwrap(), msg);
    }
    if runs(Kind::Credit)
        && let Ok(slots) = wire::decode_credits(payload)
    {
        let mut out = Vec::new();
        wire::encode_credits(&slots, &mut out);
        assert_eq!(out, payload, "CREDIT payload does not re-encode to itself");
    }
    if runs(Kind::Accept)
        && let Ok(haves) = wire::decode_haves(payload, 1 << 40)
    {
        assert_eq!(wire::encode_haves(&haves), payload, "ACCEPT payload does not re-encode to itself");
    }
    if runs(Kind::Lane)
        && let Ok(join) = wire::LaneJoin::decode(payload)
    {
        assert_eq!(wire::LaneJoin::decode(&join.encode()).unwrap(), join);
    }
    if runs(Kind::Accept)
        && let Some((rest, offer)) = wire::split_lane_token(payload.to_vec(), 2)
    {
        // The token and the rails announced re-encode to exactly the bytes split off.
        let offer = offer.expect("a lane offer with two lanes");
        assert!(offer.rails.len() <= wire::MAX_RAILS);
        let mut again = rest;
        again.extend(offer.encode());
        assert_eq!(again, payload, "the lane offer split off ACCEPT is not its last bytes");
    }
    if runs(Kind::Accept)
        && let Ok((haves, bases)) = wire::decode_accept(payload, 1 << 40, true)
    {
        let again = wire::encode_accept(&haves, Some(&bases));
        assert_eq!(again, payload, "a delta push's ACCEPT payload does not re-encode to itself");
    }
    if runs(Kind::Hello)
        && let Ok(hello) = wire::Hello::decode(payload)
    {
        shardcast_fuzz::check_manifest(&hello.manifest);
    }
}

fuzz_target!(|data: &[u8]| {
    if let Some(first) = data.first_chunk::<HEADER_LEN>()
        && let Ok(h) = Header::decode(first)
    {
        assert!(h.len <= h.kind.max_len());
        let mut again = h.to_bytes();
        if h.kind == Kind::Chunk {
            // A CHUNK's flags and reserved bytes are its coding (`push --compress`).
            let c = wire::Coding::read(first, h.len).expect("a decoded CHUNK's coding reads");
            assert!(c.is_raw() || (h.len < c.raw_len && c.raw_len <= wire::MAX_CHUNK), "{c:?}");
            c.stamp(&mut again);
            assert_eq!(&again[..], &first[..], "a CHUNK header does not re-encode to itself");
            // The payload decompresses to exactly the announced length, or not at all.
            if !c.is_raw() && c.raw_len <= 1 << 20 {
                let mut d = shardcast::compress::Decoder::new(c.raw_len).expect("a decoder");
                let payload = &data[HEADER_LEN..];
                // A delta (`push --delta`): its zstd frame after the base digest, onto a base.
                let decoded = if c.is_delta() {
                    let base = vec![0u8; c.raw_len as usize];
                    d.decode_delta(0, c, payload.get(16..).unwrap_or_default(), &base).map(<[u8]>::len)
                } else {
                    d.decode(0, c, payload).map(<[u8]>::len)
                };
                if let Ok(n) = decoded {
                    assert_eq!(n, c.raw_len as usize);
                }
            }
        } else {
            assert_eq!(first[7], 0, "a header with flags decoded");
            assert_eq!(first[12..16], [0; 4], "a header with reserved bytes decoded");
        }
        assert_eq!(Header::decode(&again), Ok(h));
    }
    // What a replica reads before a peer is authenticated: nothing longer than an AUTH.
    let mut reader = data;
    if let Ok(frame) = wire::read_frame_max(&mut reader, 1024) {
        assert!(frame.payload.len() <= 1024, "read_frame_max let a longer frame through");
    }
    let mut reader = data;
    if let Ok(frame) = wire::read_frame(&mut reader) {
        assert_ne!(frame.header.kind, Kind::Chunk, "read_frame let a CHUNK through");
        assert_eq!(frame.payload.len(), frame.header.len as usize);
        assert_eq!(&data[HEADER_LEN..HEADER_LEN + frame.payload.len()], &frame.payload[..]);
        payloads(Some(frame.header.kind), &frame.payload);
    }
    payloads(None, data);
});
