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
use ring::hmac;

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

/// Bytes a control frame's MAC adds to its payload on an authenticated connection.
pub const MAC_LEN: usize = 32;

impl SessionSecret {
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

/// On an authenticated connection, the control frames whose content matters (HELLO: what is
/// written where; RESULT: what was published) carry an HMAC of their payload under the
/// connection's session secret, after it: appends it when there is a secret.
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
