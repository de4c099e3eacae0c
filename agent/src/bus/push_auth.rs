//! Whether a config push is authorized by its signature: the decision alone, no I/O, the time passed
//! in.
//!
//! NATS permissions decide who may publish on a push subject. A node with `push.keys` also wants
//! proof that the push comes from a holder of one of those keys' seeds, made for this subject and
//! this moment: a signature over `ebb-push-v1\n<subject>\n<sent_at>\n<config_sha256>`
//! ([`ebb_sdk::push`]). docs/SECURITY.md has the threat model.
//!
//! - **No keys configured**: signatures are not required, and a `signature` that comes along is
//!   ignored, not checked: there is nothing to check it against, and a client may then sign always,
//!   so that a fleet moves to signed pushes by signing first and configuring keys second.
//! - **Keys configured**: `signature`, `sent_at` and `ttl_ms` are required, and the signature must be
//!   by one of the keys over the exact subject the request came on. Every refusal is `forbidden`
//!   (missing fields too: what is missing is the proof, not a well-formed body), except a `sent_at`
//!   that is not RFC 3339, which is `invalid_request` on every node.
//! - **The window**: a signed push is good from `sent_at - CLOCK_SKEW` to
//!   `sent_at + ttl_ms + CLOCK_SKEW`, and `ttl_ms` is at most [`MAX_SIGNED_TTL`]. `ttl_ms` is not in
//!   the signed payload, so whoever replays a captured push may raise it; the bound is what limits a
//!   replay, whatever the signer chose. The lower end refuses a push signed for later (pre-signed
//!   pushes held back). The intake refuses a late request as `expired` before it gets here; checking
//!   the window again makes this decision stand on its own.
//!
//! Within the window, the same signed push can be sent again (same subject, config and `sent_at`):
//! with the same `request_id` it gets the first reply from the request-id memory, with a new one it
//! pushes the same config, signed for this node, again.

use std::time::{Duration, SystemTime};

use ebb_sdk::push::{self, VerifyError};
use ebb_sdk::reply::ErrorCode;
use ebb_sdk::time::{format_rfc3339_millis, parse_rfc3339};

use super::intake::CLOCK_SKEW;

/// The longest `ttl_ms` of a signed push: how long a captured signed push can be replayed at most.
/// Long enough for a push fanned out to a group, short enough that a stolen message soon goes stale.
pub const MAX_SIGNED_TTL: Duration = Duration::from_secs(10 * 60);

/// A push refused: the reply's error code and message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct Refusal {
    /// [`ErrorCode::Forbidden`] or [`ErrorCode::InvalidRequest`].
    pub code: ErrorCode,
    pub message: String,
}

impl Refusal {
    fn forbidden(message: impl Into<String>) -> Self {
        Refusal {
            code: ErrorCode::Forbidden,
            message: message.into(),
        }
    }
}

/// Whether a push that came on `subject` may proceed, given this node's `keys` (nkey user public
/// keys, already checked with [`push::check_public_key`]) and the time `now`.
pub fn authorize(
    keys: &[String],
    subject: &str,
    sent_at: Option<&str>,
    ttl_ms: Option<u64>,
    config_sha256: &str,
    signature: Option<&str>,
    now: SystemTime,
) -> Result<(), Refusal> {
    if keys.is_empty() {
        return Ok(());
    }
    let (Some(sent_at), Some(ttl_ms), Some(signature)) = (sent_at, ttl_ms, signature) else {
        let missing: Vec<&str> = [
            ("signature", signature.is_none()),
            ("sent_at", sent_at.is_none()),
            ("ttl_ms", ttl_ms.is_none()),
        ]
        .iter()
        .filter(|(_, absent)| *absent)
        .map(|(name, _)| *name)
        .collect();
        return Err(Refusal::forbidden(format!(
            "this node accepts signed pushes only, and this one has no {}; send sent_at, ttl_ms \
             (at most {} ms) and a signature made with a push seed (docs/SECURITY.md)",
            missing.join(", "),
            MAX_SIGNED_TTL.as_millis()
        )));
    };
    let sent = parse_rfc3339(sent_at).map_err(|e| Refusal {
        code: ErrorCode::InvalidRequest,
        message: format!("sent_at: {e}"),
    })?;
    check_window(sent, sent_at, ttl_ms, now)?;
    push::verify(keys, subject, sent_at, config_sha256, signature).map_err(|e| match e {
        VerifyError::InvalidField(_) => Refusal {
            code: ErrorCode::InvalidRequest,
            message: e.to_string(),
        },
        _ => Refusal::forbidden(e.to_string()),
    })
}

/// Refuses a signed push outside `[sent - skew, sent + ttl + skew]` or with a `ttl_ms` above
/// [`MAX_SIGNED_TTL`].
fn check_window(
    sent: SystemTime,
    sent_at: &str,
    ttl_ms: u64,
    now: SystemTime,
) -> Result<(), Refusal> {
    let max = MAX_SIGNED_TTL.as_millis();
    if u128::from(ttl_ms) > max {
        return Err(Refusal::forbidden(format!(
            "ttl_ms {ttl_ms} is too long for a signed push: at most {max} ms, since a signed push can \
             be replayed until it expires; send a shorter ttl_ms and sign again"
        )));
    }
    match now.duration_since(sent) {
        Ok(age) => {
            let allowed = Duration::from_millis(ttl_ms).saturating_add(CLOCK_SKEW);
            if age > allowed {
                return Err(Refusal::forbidden(format!(
                    "the signed push has expired: sent at {sent_at} with ttl_ms {ttl_ms}, received at \
                     {} ({} ms of clock skew allowed); sign it again with a fresh sent_at",
                    format_rfc3339_millis(now),
                    CLOCK_SKEW.as_millis()
                )));
            }
        }
        Err(ahead) => {
            let ahead = ahead.duration();
            if ahead > CLOCK_SKEW {
                return Err(Refusal::forbidden(format!(
                    "the signed push is from the future: sent_at {sent_at} is {} ms ahead of this \
                     node's clock ({}), {} ms allowed; a push is signed when it is sent: check the \
                     sender's and the node's clocks (NTP)",
                    ahead.as_millis(),
                    format_rfc3339_millis(now),
                    CLOCK_SKEW.as_millis()
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    use nkeys::KeyPair;
    use proptest::prelude::*;

    const SUBJECT: &str = "ebb.node.web-1.push";
    const SENT_AT: &str = "2026-12-01T08:00:00.000Z";
    const SHA: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
    const TTL: u64 = 30_000;

    struct Signer {
        seed: String,
        public: String,
    }

    impl Signer {
        fn new() -> Self {
            let pair = KeyPair::new_user();
            Signer {
                seed: pair.seed().unwrap(),
                public: pair.public_key(),
            }
        }

        fn sign(&self, subject: &str, sent_at: &str, sha: &str) -> String {
            push::sign(&self.seed, subject, sent_at, sha).unwrap()
        }
    }

    fn at(s: &str) -> SystemTime {
        parse_rfc3339(s).unwrap()
    }

    fn t0() -> SystemTime {
        at(SENT_AT)
    }

    /// `authorize` of a push sent at `SENT_AT` with `TTL` for `SHA`, carrying `signature`.
    fn signed(
        keys: &[String],
        subject: &str,
        signature: &str,
        now: SystemTime,
    ) -> Result<(), Refusal> {
        authorize(
            keys,
            subject,
            Some(SENT_AT),
            Some(TTL),
            SHA,
            Some(signature),
            now,
        )
    }

    fn code(result: Result<(), Refusal>) -> ErrorCode {
        result.unwrap_err().code
    }

    #[test]
    fn without_keys_anything_goes_and_a_signature_is_ignored() {
        let now = t0();
        assert_eq!(authorize(&[], SUBJECT, None, None, SHA, None, now), Ok(()));
        assert_eq!(
            authorize(
                &[],
                SUBJECT,
                Some(SENT_AT),
                Some(TTL),
                SHA,
                Some("garbage"),
                now
            ),
            Ok(())
        );
    }

    #[test]
    fn a_signed_push_for_this_subject_passes() {
        let signer = Signer::new();
        let keys = vec![Signer::new().public, signer.public.clone()];
        let signature = signer.sign(SUBJECT, SENT_AT, SHA);
        for now in [
            t0(),
            t0() - CLOCK_SKEW,
            t0() + Duration::from_millis(TTL) + CLOCK_SKEW,
        ] {
            assert_eq!(signed(&keys, SUBJECT, &signature, now), Ok(()));
        }
    }

    #[test]
    fn with_keys_an_unsigned_push_is_forbidden_and_told_what_is_missing() {
        let keys = vec![Signer::new().public];
        let err = authorize(&keys, SUBJECT, None, None, SHA, None, t0()).unwrap_err();
        assert_eq!(err.code, ErrorCode::Forbidden);
        assert!(
            err.message.contains("no signature, sent_at, ttl_ms"),
            "{}",
            err.message
        );
        let err = authorize(&keys, SUBJECT, Some(SENT_AT), None, SHA, Some("x"), t0()).unwrap_err();
        assert_eq!(err.code, ErrorCode::Forbidden);
        assert!(err.message.contains("no ttl_ms;"), "{}", err.message);
        let err = authorize(&keys, SUBJECT, Some(SENT_AT), Some(TTL), SHA, None, t0()).unwrap_err();
        assert!(err.message.contains("no signature;"), "{}", err.message);
        assert!(!err.message.contains(&keys[0]), "never names the keys");
    }

    #[test]
    fn a_foreign_key_is_forbidden() {
        let keys = vec![Signer::new().public];
        let signature = Signer::new().sign(SUBJECT, SENT_AT, SHA);
        let err = signed(&keys, SUBJECT, &signature, t0()).unwrap_err();
        assert_eq!(err.code, ErrorCode::Forbidden);
        assert!(err.message.contains("push.keys"), "{}", err.message);
        assert!(err.to_string().starts_with("forbidden: "), "{err}");
    }

    #[test]
    fn a_signature_for_another_subject_is_forbidden() {
        let signer = Signer::new();
        let keys = vec![signer.public.clone()];
        let cases = [
            // Another node.
            ("ebb.node.web-2.push", SUBJECT),
            // The group, replayed to one node of it.
            ("ebb.group.web.push", SUBJECT),
            // One node's, replayed to its group, or to all.
            (SUBJECT, "ebb.group.web.push"),
            (SUBJECT, "ebb.all.push"),
        ];
        for (signed_for, sent_to) in cases {
            let signature = signer.sign(signed_for, SENT_AT, SHA);
            let result = signed(&keys, sent_to, &signature, t0());
            assert_eq!(
                code(result),
                ErrorCode::Forbidden,
                "{signed_for} → {sent_to}"
            );
        }
    }

    #[test]
    fn a_tampered_config_digest_is_forbidden() {
        let signer = Signer::new();
        let keys = vec![signer.public.clone()];
        let signature = signer.sign(SUBJECT, SENT_AT, SHA);
        let other = "0".repeat(64);
        let result = authorize(
            &keys,
            SUBJECT,
            Some(SENT_AT),
            Some(TTL),
            &other,
            Some(&signature),
            t0(),
        );
        assert_eq!(code(result), ErrorCode::Forbidden);
    }

    #[test]
    fn outside_its_window_a_signed_push_is_forbidden() {
        let signer = Signer::new();
        let keys = vec![signer.public.clone()];
        let signature = signer.sign(SUBJECT, SENT_AT, SHA);
        let check = |now| signed(&keys, SUBJECT, &signature, now).unwrap_err();
        let late = check(t0() + Duration::from_millis(TTL) + CLOCK_SKEW + Duration::from_millis(1));
        assert_eq!(late.code, ErrorCode::Forbidden);
        assert!(late.message.contains("expired"), "{}", late.message);
        let early = check(t0() - CLOCK_SKEW - Duration::from_millis(1));
        assert_eq!(early.code, ErrorCode::Forbidden);
        assert!(early.message.contains("future"), "{}", early.message);
        // ttl_ms 0: the skew alone.
        let zero = authorize(
            &keys,
            SUBJECT,
            Some(SENT_AT),
            Some(0),
            SHA,
            Some(&signature),
            t0() + CLOCK_SKEW,
        );
        assert_eq!(zero, Ok(()));
    }

    #[test]
    fn a_long_ttl_is_forbidden_for_signed_pushes() {
        let signer = Signer::new();
        let keys = vec![signer.public.clone()];
        let signature = signer.sign(SUBJECT, SENT_AT, SHA);
        let max = MAX_SIGNED_TTL.as_millis() as u64;
        let ok = authorize(
            &keys,
            SUBJECT,
            Some(SENT_AT),
            Some(max),
            SHA,
            Some(&signature),
            t0(),
        );
        assert_eq!(ok, Ok(()));
        for ttl in [max + 1, u64::MAX] {
            let err = authorize(
                &keys,
                SUBJECT,
                Some(SENT_AT),
                Some(ttl),
                SHA,
                Some(&signature),
                t0(),
            )
            .unwrap_err();
            assert_eq!(err.code, ErrorCode::Forbidden);
            assert!(err.message.contains("at most 600000 ms"), "{}", err.message);
        }
    }

    #[test]
    fn a_malformed_signature_is_forbidden() {
        let keys = vec![Signer::new().public];
        for bad in ["", "abc", "A==", &"A".repeat(86)] {
            let err = authorize(
                &keys,
                SUBJECT,
                Some(SENT_AT),
                Some(TTL),
                SHA,
                Some(bad),
                t0(),
            )
            .unwrap_err();
            assert_eq!(err.code, ErrorCode::Forbidden, "{bad}");
        }
        let err = authorize(
            &keys,
            SUBJECT,
            Some(SENT_AT),
            Some(TTL),
            SHA,
            Some("abc"),
            t0(),
        )
        .unwrap_err();
        assert!(err.message.contains("base64url"), "{}", err.message);
    }

    #[test]
    fn a_malformed_body_is_an_invalid_request() {
        let signer = Signer::new();
        let keys = vec![signer.public.clone()];
        let signature = signer.sign(SUBJECT, SENT_AT, SHA);
        let bad_time = authorize(
            &keys,
            SUBJECT,
            Some("yesterday"),
            Some(TTL),
            SHA,
            Some(&signature),
            t0(),
        );
        assert_eq!(code(bad_time), ErrorCode::InvalidRequest);
        let bad_sha = authorize(
            &keys,
            SUBJECT,
            Some(SENT_AT),
            Some(TTL),
            "ABC",
            Some(&signature),
            t0(),
        );
        assert_eq!(code(bad_sha), ErrorCode::InvalidRequest);
    }

    #[test]
    fn the_same_instant_written_otherwise_does_not_verify() {
        // sent_at is signed as sent, character for character.
        let signer = Signer::new();
        let keys = vec![signer.public.clone()];
        let signature = signer.sign(SUBJECT, SENT_AT, SHA);
        let result = authorize(
            &keys,
            SUBJECT,
            Some("2026-12-01T09:00:00+01:00"),
            Some(TTL),
            SHA,
            Some(&signature),
            t0(),
        );
        assert_eq!(code(result), ErrorCode::Forbidden);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(10_000))]

        /// Random signatures, subjects and times never panic and never pass when keys are set.
        #[test]
        fn random_pushes_never_pass(
            signature in prop_oneof!["[A-Za-z0-9_-]{86}", any::<String>()],
            subject in prop_oneof![Just(SUBJECT.to_string()), "[a-z0-9.*>-]{1,40}", any::<String>()],
            sent_at in prop_oneof![Just(SENT_AT.to_string()), any::<String>()],
            ttl_ms in any::<u64>(),
            offset_ms in -10_000_000i64..10_000_000,
        ) {
            let keys = vec!["UAMX62ZD4FWIKMWGVPEDR6WNL2TYTPQMO2ZJEAZUAON7VCZ5G2GWCXLM".to_string()];
            let now = if offset_ms >= 0 {
                t0() + Duration::from_millis(offset_ms as u64)
            } else {
                t0() - Duration::from_millis(offset_ms.unsigned_abs())
            };
            let result = authorize(&keys, &subject, Some(&sent_at), Some(ttl_ms), SHA, Some(&signature), now);
            prop_assert!(result.is_err());
        }
    }
}
