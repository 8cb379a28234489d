//! Signed deliveries: `X-Standby-Signature: sha256=<hex>` is HMAC-SHA256 with the webhook's
//! secret over `<timestamp>.<raw body>`, where `<timestamp>` (unix seconds) is also sent as
//! `X-Standby-Timestamp`. The timestamp inside the MAC lets a receiver refuse replays: it checks
//! the MAC, then that the timestamp is recent (a few minutes), then dedups by the body's `id`.
//! Each retry is signed afresh with its own timestamp, so a delivery late after an outage still
//! falls inside a receiver's window.

use ring::hmac;

use crate::text::unhex;

pub const SIGNATURE_HEADER: &str = "X-Standby-Signature";
pub const TIMESTAMP_HEADER: &str = "X-Standby-Timestamp";

/// A webhook's HMAC key (never printed: `Debug` shows only that it exists).
#[derive(Clone)]
pub struct Secret(hmac::Key);

impl Secret {
    pub fn new(bytes: &[u8]) -> Secret {
        Secret(hmac::Key::new(hmac::HMAC_SHA256, bytes))
    }

    /// The header value `sha256=<hex>` for `body` sent at `timestamp` (unix seconds).
    pub fn sign(&self, timestamp: u64, body: &[u8]) -> String {
        let mut ctx = hmac::Context::with_key(&self.0);
        ctx.update(timestamp.to_string().as_bytes());
        ctx.update(b".");
        ctx.update(body);
        format!("sha256={}", crate::text::hex(ctx.sign().as_ref()))
    }

    /// Whether `header` is this secret's signature of `body` at `timestamp` (constant time);
    /// what a receiver written in Rust would call.
    pub fn verify(&self, timestamp: u64, body: &[u8], header: &str) -> bool {
        let Some(hex) = header.strip_prefix("sha256=") else {
            return false;
        };
        let Some(tag) = unhex(hex) else {
            return false;
        };
        let mut msg = timestamp.to_string().into_bytes();
        msg.push(b'.');
        msg.extend_from_slice(body);
        hmac::verify(&self.0, &msg, &tag).is_ok()
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The MAC is the standard HMAC-SHA256 (RFC 4231 test case 2) of `<ts>.<body>`, so any
    /// language's library checks it.
    #[test]
    fn signature_is_hmac_sha256_of_timestamp_dot_body() {
        // RFC 4231 test case 2 pins the primitive; the one-shot MAC of "<ts>.<body>" pins
        // what it is applied to.
        let key = hmac::Key::new(hmac::HMAC_SHA256, b"Jefe");
        let tag = hmac::sign(&key, b"what do ya want for nothing?");
        assert_eq!(
            crate::text::hex(tag.as_ref()),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        let s = Secret::new(b"Jefe");
        let one_shot = hmac::sign(&key, b"1700000000.{\"a\":1}");
        assert_eq!(
            s.sign(1_700_000_000, b"{\"a\":1}"),
            format!("sha256={}", crate::text::hex(one_shot.as_ref()))
        );
    }

    #[test]
    fn verify_refuses_other_bodies_times_secrets_and_shapes() {
        let s = Secret::new(b"s3cret");
        let body = br#"{"kind":"failover"}"#;
        let h = s.sign(1_700_000_000, body);
        assert!(h.starts_with("sha256=") && h.len() == 7 + 64, "{h}");
        assert!(s.verify(1_700_000_000, body, &h));
        assert!(
            !s.verify(1_700_000_001, body, &h),
            "a replay with a new time"
        );
        assert!(!s.verify(1_700_000_000, br#"{"kind":"recovered"}"#, &h));
        assert!(!Secret::new(b"other").verify(1_700_000_000, body, &h));
        assert!(!s.verify(1_700_000_000, body, &h[7..]));
        assert!(!s.verify(1_700_000_000, body, "sha256=zz"));
        assert!(!s.verify(1_700_000_000, body, "sha256=é"));
        assert_eq!(format!("{s:?}"), "Secret(..)");
    }
}
