//! Chunk encryption on TCP hops (`--encrypt`): AES-256-GCM through aws-lc-rs.
//!
//! Every hop authenticates with the cluster key first (`auth.rs`); both ends then hold a
//! session secret that only they can compute (HMAC of the key over both handshake nonces), and
//! derive this hop's chunk key from it. So each hop, and each connection of it, has its own
//! key: relays decrypt what they receive (they verify and store plaintext) and encrypt again
//! for the next hop under that hop's key.
//!
//! On an encrypted hop a CHUNK frame is its usual 40-byte header (in clear: the receiver needs
//! the length; it is the AEAD's associated data, so it cannot be altered) followed by the
//! encrypted payload and its 16-byte GCM tag. The nonce is the number of chunk frames sent on
//! the connection before this one: it is never reused under a key, and a chunk dropped,
//! replayed or reordered in transit fails to open. The control frames after HELLO (END, ACK,
//! RESULT) carry no shard bytes and are not encrypted; END's manifest digest, checked by every
//! replica, still catches a stream cut short.

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use aws_lc_rs::hmac;

/// Bytes the GCM tag adds after each chunk's payload.
pub const TAG_LEN: usize = 16;

/// A secret both ends of one authenticated connection share, and nobody else.
#[derive(Clone)]
pub struct SessionSecret(pub(crate) [u8; 32]);

impl std::fmt::Debug for SessionSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionSecret(..)")
    }
}

/// The MAC label of HELLO.
pub const LABEL_HELLO: &[u8] = b"shardcast hello";
/// The MAC label of RESULT.
pub const LABEL_RESULT: &[u8] = b"shardcast result";
/// The MAC label of ACCEPT (a routed push's list of chunks each node already holds).
pub const LABEL_ACCEPT: &[u8] = b"shardcast accept";
/// The MAC label of REJECT (why a node refused, or that it already holds the version).
pub const LABEL_REJECT: &[u8] = b"shardcast reject";
/// The MAC label of STATUS_RESP (what a replica holds).
pub const LABEL_STATUS: &[u8] = b"shardcast status";
/// The MAC label of the upstream end's TRANSPORT offer.
pub const LABEL_TRANSPORT_OFFER: &[u8] = b"shardcast transport offer";
/// The MAC label of the downstream end's TRANSPORT answer (its own label: an offer reflected
/// back does not pass as the answer).
pub const LABEL_TRANSPORT_ANSWER: &[u8] = b"shardcast transport answer";

/// The MAC label of LANE (a further lane joining a push).
pub const LABEL_LANE: &[u8] = b"shardcast lane";

/// Bytes a control frame's MAC adds to its payload on an authenticated connection.
pub const MAC_LEN: usize = 32;

impl SessionSecret {
    /// A secret from its bytes (the handshakes derive them; tests and fuzzing make their own).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    fn mac_key(&self) -> hmac::Key {
        hmac::Key::new(hmac::HMAC_SHA256, &self.0)
    }

    fn chunk_key(&self) -> LessSafeKey {
        let tag =
            hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, &self.0), b"shardcast v4 chunks, upstream to downstream");
        let key = UnboundKey::new(&AES_256_GCM, tag.as_ref()).expect("a 32-byte key is valid for AES-256-GCM");
        LessSafeKey::new(key)
    }
}

/// On an authenticated connection, every control frame sent after the handshake whose content
/// decides something (HELLO: what is written where; ACCEPT: what each node holds; REJECT: why
/// not, or that a node already holds the version; RESULT: what was published; TRANSPORT: which
/// link a hop takes; STATUS_RESP: what a replica holds) carries an HMAC of its payload under the
/// connection's session secret, after it, with a label per frame (and per direction where both
/// ends send one): appends it when there is a secret. Each of these frames is sent at most once
/// each way on a connection, and the secret is the connection's own, so a replay has nothing to
/// stand in for.
pub fn seal_frame(secret: Option<&SessionSecret>, label: &[u8], mut payload: Vec<u8>) -> Vec<u8> {
    if let Some(s) = secret {
        let mut ctx = hmac::Context::with_key(&s.mac_key());
        ctx.update(label);
        ctx.update(&payload);
        payload.extend_from_slice(ctx.sign().as_ref());
    }
    payload
}

/// Checks and strips the MAC [`seal_frame`] added (when there is a secret).
pub fn open_frame<'a>(
    secret: Option<&SessionSecret>,
    label: &[u8],
    payload: &'a [u8],
) -> Result<&'a [u8], Unauthentic> {
    let Some(s) = secret else { return Ok(payload) };
    let body_len = payload.len().checked_sub(MAC_LEN).ok_or(Unauthentic)?;
    let (body, tag) = payload.split_at(body_len);
    let mut msg = Vec::with_capacity(label.len() + body.len());
    msg.extend_from_slice(label);
    msg.extend_from_slice(body);
    hmac::verify(&s.mac_key(), &msg, tag).map_err(|_| Unauthentic)?;
    Ok(body)
}

fn nonce(counter: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_be_bytes());
    Nonce::assume_unique_for_key(n)
}

/// The sending end of an encrypted hop.
pub struct Sealer {
    key: LessSafeKey,
    sent: u64,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Sealer({} sealed)", self.sent)
    }
}

impl Sealer {
    /// The sender's key for the hop whose handshake gave `secret`.
    pub fn new(secret: &SessionSecret) -> Self {
        Self { key: secret.chunk_key(), sent: 0 }
    }

    /// Encrypts `frame[header_len..len]` in place, with `frame[..header_len]` as associated
    /// data, and writes the tag into `frame[len..len + TAG_LEN]`.
    pub fn seal(&mut self, frame: &mut [u8], header_len: usize, len: usize) {
        let (header, rest) = frame.split_at_mut(header_len);
        let (payload, tail) = rest.split_at_mut(len - header_len);
        let tag = self
            .key
            .seal_in_place_separate_tag(nonce(self.sent), Aad::from(&*header), payload)
            .expect("AES-GCM seals any payload shorter than 64 GiB");
        tail[..TAG_LEN].copy_from_slice(tag.as_ref());
        self.sent += 1;
    }
}

/// The receiving end of an encrypted hop.
pub struct Opener {
    key: LessSafeKey,
    opened: u64,
}

impl std::fmt::Debug for Opener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Opener({} opened)", self.opened)
    }
}

impl Opener {
    /// The receiver's key for the hop whose handshake gave `secret`.
    pub fn new(secret: &SessionSecret) -> Self {
        Self { key: secret.chunk_key(), opened: 0 }
    }

    /// Decrypts `sealed` (payload then tag) in place, checking it against `header`; on success
    /// the payload (`sealed[..len - TAG_LEN]`) is plaintext. Fails when a byte of either was
    /// changed, the frame is not the next one sent, or the sender has another key.
    pub fn open(&mut self, header: &[u8], sealed: &mut [u8]) -> Result<(), Unauthentic> {
        let n = nonce(self.opened);
        self.opened += 1;
        self.key.open_in_place(n, Aad::from(header), sealed).map(|_| ()).map_err(|_| Unauthentic)
    }
}

/// Bytes of the MAC after a data-plane frame on an authenticated connection (see [`FrameMacs`]).
pub const FRAME_MAC_LEN: usize = 16;

/// The data-plane frame MACs of one end of an authenticated hop (a cluster key or TLS).
///
/// Every frame that decides what gets published carries, after its payload, 16 bytes of
/// HMAC-SHA256 under a key derived from the connection's session secret, over: the direction,
/// the number of such frames sent that way on the connection before it, the 40-byte header
/// and (CREDIT) the payload. CHUNK and END go downstream (a CHUNK's MAC only on a hop without
/// `--encrypt`, where GCM already covers it), ACK and CREDIT come back. A CHUNK's payload is not
/// MACed: its header holds the xxh3-128 digest of the payload, which every receiver checks, so
/// the MAC binds the bytes through it at the cost of one HMAC over ~60 bytes per frame. The
/// counter makes a frame dropped, replayed or reordered fail, and the direction a frame
/// reflected back. A relay checks the MAC of each frame from upstream and computes its own for
/// the next hop (its own session secret).
pub struct FrameMacs {
    key: hmac::Key,
    out_label: &'static [u8],
    in_label: &'static [u8],
    sent: u64,
    received: u64,
}

impl std::fmt::Debug for FrameMacs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FrameMacs({} sent, {} received)", self.sent, self.received)
    }
}

const LABEL_DOWN: &[u8] = b"shardcast v5 frame, upstream to downstream";
const LABEL_UP: &[u8] = b"shardcast v5 frame, downstream to upstream";

impl FrameMacs {
    fn new(secret: &SessionSecret, out_label: &'static [u8], in_label: &'static [u8]) -> Self {
        let k = hmac::sign(&secret.mac_key(), b"shardcast v5 frame macs");
        Self { key: hmac::Key::new(hmac::HMAC_SHA256, k.as_ref()), out_label, in_label, sent: 0, received: 0 }
    }

    /// The end that sends chunks (the primary, or a relay towards the next node).
    pub fn upstream_end(secret: &SessionSecret) -> Self {
        Self::new(secret, LABEL_DOWN, LABEL_UP)
    }

    /// The end that receives chunks (a replica, from the node before it).
    pub fn downstream_end(secret: &SessionSecret) -> Self {
        Self::new(secret, LABEL_UP, LABEL_DOWN)
    }

    fn mac(&self, label: &[u8], n: u64, header: &[u8], payload: &[u8]) -> [u8; FRAME_MAC_LEN] {
        let mut ctx = hmac::Context::with_key(&self.key);
        ctx.update(label);
        ctx.update(&n.to_le_bytes());
        ctx.update(header);
        ctx.update(payload);
        ctx.sign().as_ref()[..FRAME_MAC_LEN].try_into().expect("HMAC-SHA256 is 32 bytes")
    }

    /// The MAC of the next frame this end sends.
    pub fn sign(&mut self, header: &[u8], payload: &[u8]) -> [u8; FRAME_MAC_LEN] {
        let m = self.mac(self.out_label, self.sent, header, payload);
        self.sent += 1;
        m
    }

    /// Checks the MAC of the next frame this end receives (in constant time).
    pub fn verify(&mut self, header: &[u8], payload: &[u8], mac: &[u8]) -> Result<(), Unauthentic> {
        let want = self.mac(self.in_label, self.received, header, payload);
        self.received += 1;
        let diff = want.iter().zip(mac).fold(0u8, |acc, (a, b)| acc | (a ^ b));
        if mac.len() == FRAME_MAC_LEN && diff == 0 { Ok(()) } else { Err(Unauthentic) }
    }
}

/// An encrypted chunk that does not authenticate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the chunk does not authenticate")]
pub struct Unauthentic;

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(payload: &[u8]) -> Vec<u8> {
        let mut f = vec![7u8; 40];
        f.extend_from_slice(payload);
        f.extend_from_slice(&[0; TAG_LEN]);
        f
    }

    /// Opens a copy of `frame` (header, then sealed payload) with `rx`.
    fn open_copy(rx: &mut Opener, frame: &[u8]) -> Result<Vec<u8>, Unauthentic> {
        let mut f = frame.to_vec();
        let (h, p) = f.split_at_mut(40);
        rx.open(h, p)?;
        Ok(f)
    }

    #[test]
    fn control_frames_open_only_unchanged_under_their_label_and_secret() {
        let (s, other) = (SessionSecret([1; 32]), SessionSecret([2; 32]));
        let sealed = seal_frame(Some(&s), b"hello", b"payload".to_vec());
        assert_eq!(sealed.len(), 7 + MAC_LEN);
        assert_eq!(open_frame(Some(&s), b"hello", &sealed), Ok(&b"payload"[..]));
        assert!(open_frame(Some(&s), b"result", &sealed).is_err(), "another label");
        assert!(open_frame(Some(&other), b"hello", &sealed).is_err(), "another secret");
        let mut changed = sealed.clone();
        changed[0] ^= 1;
        assert!(open_frame(Some(&s), b"hello", &changed).is_err(), "a changed byte");
        assert!(open_frame(Some(&s), b"hello", &sealed[..10]).is_err(), "cut short");
        assert_eq!(seal_frame(None, b"hello", b"x".to_vec()), b"x", "no secret, no MAC");
    }

    #[test]
    fn frame_macs_check_only_the_next_frame_unchanged_and_in_its_direction() {
        let (s, other) = (SessionSecret([3; 32]), SessionSecret([4; 32]));
        let (mut up, mut down) = (FrameMacs::upstream_end(&s), FrameMacs::downstream_end(&s));
        let h1 = [1u8; 40];
        let h2 = [2u8; 40];
        let m1 = up.sign(&h1, &[]);
        let m2 = up.sign(&h2, b"credits");
        assert_ne!(m1, up.mac(LABEL_DOWN, 0, &h2, &[]), "the header is covered");
        assert!(down.verify(&h1, &[], &m1).is_ok());
        assert!(down.verify(&h2, b"credits", &m2).is_ok(), "in order");
        // Replayed, changed, dropped, reflected, another secret: refused.
        let mut d = FrameMacs::downstream_end(&s);
        assert!(d.verify(&h2, b"credits", &m2).is_err(), "the second frame first (the first dropped)");
        let mut d = FrameMacs::downstream_end(&s);
        let mut h = h1;
        h[30] ^= 1;
        assert!(d.verify(&h, &[], &m1).is_err(), "a changed header (digest)");
        let mut d = FrameMacs::downstream_end(&s);
        assert!(d.verify(&h1, &[], &m1[..8]).is_err(), "a short MAC");
        let mut back = FrameMacs::upstream_end(&s);
        assert!(back.verify(&h1, &[], &m1).is_err(), "reflected back upstream");
        assert!(FrameMacs::downstream_end(&other).verify(&h1, &[], &m1).is_err(), "another secret");
        let mut d = FrameMacs::downstream_end(&s);
        d.verify(&h1, &[], &m1).unwrap();
        assert!(d.verify(&h1, &[], &m1).is_err(), "a replay");
    }

    #[test]
    fn sealed_chunks_open_in_order_and_only_unchanged() {
        let secret = SessionSecret([9; 32]);
        let (mut tx, mut rx) = (Sealer::new(&secret), Opener::new(&secret));
        let plain: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
        let mut a = frame(&plain);
        let len = a.len() - TAG_LEN;
        tx.seal(&mut a, 40, len);
        assert_ne!(&a[40..len], &plain[..], "the payload is encrypted");
        let mut b = frame(&plain);
        tx.seal(&mut b, 40, len);
        assert_ne!(a[40..], b[40..], "the same bytes encrypt differently as the next frame");

        let a2 = open_copy(&mut rx, &a).expect("the first frame opens");
        assert_eq!(&a2[40..len], &plain[..]);

        // A replayed frame, a changed header, a changed byte, another key: all refused.
        assert!(open_copy(&mut Opener::new(&secret), &b).is_err(), "out of order");
        let mut flipped = b.clone();
        flipped[100] ^= 1;
        let mut rx2 = Opener::new(&secret);
        open_copy(&mut rx2, &a).expect("first");
        assert!(open_copy(&mut rx2, &flipped).is_err(), "changed payload");
        let mut rx3 = Opener::new(&secret);
        open_copy(&mut rx3, &a).expect("first");
        let mut header = b.clone();
        header[3] ^= 1;
        assert!(open_copy(&mut rx3, &header).is_err(), "changed header");
        let mut rx4 = Opener::new(&secret);
        open_copy(&mut rx4, &a).expect("first");
        assert!(open_copy(&mut rx4, &b).is_ok(), "the second frame opens after the first");
        assert!(open_copy(&mut Opener::new(&SessionSecret([8; 32])), &a).is_err(), "another key");
    }
}
