//! Push signatures: who may push a config, beyond who may publish on the push subject.
//!
//! NATS permissions say who may publish on `<prefix>.node.<id>.push`; they do not say what a config
//! may contain, and a leaked NATS credential with publish rights would be enough to push. A node with
//! `push.keys` (nkey user public keys, `U…`) therefore also requires an ed25519 signature by one of
//! those keys, made with a seed (`SU…`) that never travels over NATS. docs/SECURITY.md has the threat
//! model and the key rotation.
//!
//! The signature is over the bytes of
//!
//! ```text
//! ebb-push-v1\n<subject>\n<sent_at>\n<config_sha256>
//! ```
//!
//! - `ebb-push-v1` ([`SIGNING_CONTEXT`]) keeps a push signature from ever being valid for anything
//!   else made with the same key, and names the version of this format.
//! - `<subject>` is the exact NATS subject the request is sent to, so a signature for
//!   `ebb.node.web-1.push` is worthless on `ebb.node.web-2.push`, `ebb.group.web.push` or
//!   `ebb.all.push`.
//! - `<sent_at>` is the request's `sent_at`, character for character as sent, so a signature holds for
//!   one time window only (the agent bounds `ttl_ms` for signed pushes).
//! - `<config_sha256>` binds the config: the agent checks separately that it is the digest of the
//!   pushed bytes.
//!
//! No field may contain a line feed (subjects have no whitespace, RFC 3339 times and hex digests
//! none), so the payload reads back one way only. [`sign`] and [`verify`] both refuse a field that
//! breaks this.
//!
//! The signature travels as unpadded base64url (RFC 4648 §5, no `=`): 86 characters for 64 bytes.
//! ed25519 is deterministic: the same seed and payload always give the same signature, which is what
//! the test vector in docs/SECURITY.md (and in this module's tests) pins.

use std::path::{Path, PathBuf};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use nkeys::{KeyPair, KeyPairType};

use crate::command::is_sha256_hex;
use crate::time::parse_rfc3339;

/// The first line of every signed payload, and the version of the format.
pub const SIGNING_CONTEXT: &str = "ebb-push-v1";

/// Length of an ed25519 signature in bytes.
const SIGNATURE_BYTES: usize = 64;
/// Length of its unpadded base64url form.
const SIGNATURE_CHARS: usize = 86;

/// The bytes a push signature is made over: `ebb-push-v1\n<subject>\n<sent_at>\n<config_sha256>`,
/// no trailing line feed.
pub fn signing_payload(subject: &str, sent_at: &str, config_sha256: &str) -> String {
    format!("{SIGNING_CONTEXT}\n{subject}\n{sent_at}\n{config_sha256}")
}

/// Why a push could not be signed. Never carries the seed.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    /// The text is not an nkey seed at all (bad encoding, checksum or length).
    #[error(
        "not an nkey seed ({reason}); expected a user seed starting with SU, as written by `nk -gen user` \
         or `nsc generate nkey --user`"
    )]
    InvalidSeed { reason: String },
    /// A valid seed of another kind (account, operator, server, …).
    #[error(
        "this is the seed of an nkey {kind} key (it starts with {prefix}), not of a user key (SU…); \
         push.keys only hold user public keys (U…): generate a user key with `nk -gen user`"
    )]
    NotUserSeed { kind: String, prefix: String },
    /// One of the signed fields cannot be signed (see [`signing_payload`]).
    #[error("cannot sign: {0}")]
    InvalidField(String),
    /// The seed file could not be read.
    #[error("cannot read the push seed file {}: {source}", path.display())]
    ReadSeedFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The seed file holds more than the seed.
    #[error(
        "{} does not hold one nkey seed: {reason}; a push seed file holds a single line `SU…` (as \
         written by `nk -gen user`). Keep the push key apart from NATS credentials (.creds files)",
        path.display()
    )]
    SeedFileContent { path: PathBuf, reason: &'static str },
    /// The signing itself failed (never expected with a seed).
    #[error("signing failed: {0}")]
    Signing(String),
}

/// Why a push signature was not accepted. The messages say what is wrong and what to do, and never
/// name the keys a node trusts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// No key to verify against: the caller must not ask (a node without `push.keys` does not require
    /// signatures). Never read as "valid".
    #[error("no push keys are configured to verify the signature against")]
    NoKeys,
    /// The signature is the empty string.
    #[error(
        "the push signature is empty; sign `{SIGNING_CONTEXT}\\n<subject>\\n<sent_at>\\n<config_sha256>` \
         with a push seed (docs/SECURITY.md)"
    )]
    Empty,
    /// Not unpadded base64url of 64 bytes.
    #[error(
        "the push signature is malformed ({reason}); send the 64-byte ed25519 signature as unpadded \
         base64url (86 characters, no `=`)"
    )]
    Malformed { reason: String },
    /// One of the signed fields cannot have been signed (see [`signing_payload`]).
    #[error("the push cannot be verified: {0}")]
    InvalidField(String),
    /// Well formed, but no configured key made it over this payload.
    #[error(
        "the push signature does not verify for subject {subject}: it was made by a key this node does \
         not trust, or over another subject, sent_at or config_sha256; sign with a seed whose public \
         key is in push.keys, over the exact subject the request is sent to"
    )]
    NoKeyMatched { subject: String },
}

/// Why a configured push key is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error(
        "push key `{key}` is not an nkey public key ({reason}); expected a user public key starting \
         with U (`nk -inkey <seed file> -pubout` prints it)"
    )]
    Invalid { key: String, reason: String },
    #[error(
        "push key `{key}` is an nkey {kind} public key, not a user key; push.keys only hold user public \
         keys (U…): generate a user key with `nk -gen user`"
    )]
    NotUser { key: String, kind: String },
}

/// Checks a configured push key: an nkey user public key (`U…`, 56 characters, valid checksum).
/// For config validation at load, so that a typo never silently leaves a node without a usable key.
pub fn check_public_key(key: &str) -> Result<(), KeyError> {
    let pair = KeyPair::from_public_key(key).map_err(|e| KeyError::Invalid {
        key: key.to_string(),
        reason: e.to_string(),
    })?;
    match pair.key_pair_type() {
        KeyPairType::User => Ok(()),
        other => Err(KeyError::NotUser {
            key: key.to_string(),
            kind: kind_name(&other).to_string(),
        }),
    }
}

/// Signs a push to `subject` sent at `sent_at` with config digest `config_sha256`, with an nkey user
/// seed (`SU…`). Returns the signature as unpadded base64url, the value of the request's `signature`.
pub fn sign(
    seed: &str,
    subject: &str,
    sent_at: &str,
    config_sha256: &str,
) -> Result<String, SignError> {
    let pair = user_pair_from_seed(seed.trim())?;
    check_fields(subject, sent_at, config_sha256).map_err(SignError::InvalidField)?;
    let payload = signing_payload(subject, sent_at, config_sha256);
    let signature = pair
        .sign(payload.as_bytes())
        .map_err(|e| SignError::Signing(e.to_string()))?;
    Ok(URL_SAFE_NO_PAD.encode(signature))
}

/// Reads a push seed file: one nkey user seed (`SU…`), surrounding whitespace trimmed. A file with
/// anything else (a `.creds` file, several keys, another kind of seed) is refused.
pub fn read_seed_file(path: impl AsRef<Path>) -> Result<String, SignError> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path).map_err(|source| SignError::ReadSeedFile {
        path: path.to_path_buf(),
        source,
    })?;
    let seed = text.trim();
    let content = |reason| SignError::SeedFileContent {
        path: path.to_path_buf(),
        reason,
    };
    if seed.is_empty() {
        return Err(content("the file is empty"));
    }
    if seed.lines().count() > 1 {
        return Err(content("it has more than one line"));
    }
    user_pair_from_seed(seed)?;
    Ok(seed.to_string())
}

/// Verifies a push signature against `keys` (nkey user public keys): accepted when one of them made
/// `signature` over [`signing_payload`]`(subject, sent_at, config_sha256)`.
///
/// A configured key that is not a valid user public key is skipped (config validation refuses it with
/// [`check_public_key`] before it gets here); it never makes a signature valid.
pub fn verify(
    keys: &[String],
    subject: &str,
    sent_at: &str,
    config_sha256: &str,
    signature: &str,
) -> Result<(), VerifyError> {
    if keys.is_empty() {
        return Err(VerifyError::NoKeys);
    }
    let signature = decode_signature(signature)?;
    check_fields(subject, sent_at, config_sha256).map_err(VerifyError::InvalidField)?;
    let payload = signing_payload(subject, sent_at, config_sha256);
    let matched = keys
        .iter()
        .filter_map(|key| KeyPair::from_public_key(key).ok())
        .filter(|pair| pair.key_pair_type() == KeyPairType::User)
        .any(|pair| pair.verify(payload.as_bytes(), &signature).is_ok());
    if matched {
        Ok(())
    } else {
        Err(VerifyError::NoKeyMatched {
            subject: subject.to_string(),
        })
    }
}

/// The 64 signature bytes of `signature`, or why it is not unpadded base64url of them.
fn decode_signature(signature: &str) -> Result<Vec<u8>, VerifyError> {
    let malformed = |reason: String| VerifyError::Malformed { reason };
    if signature.is_empty() {
        return Err(VerifyError::Empty);
    }
    // Checked before decoding, so that a huge value costs nothing and the message can say the length.
    if signature.len() != SIGNATURE_CHARS {
        return Err(malformed(format!(
            "{} characters, expected {SIGNATURE_CHARS}",
            signature.len()
        )));
    }
    let bytes = URL_SAFE_NO_PAD
        .decode(signature)
        .map_err(|e| malformed(format!("not unpadded base64url: {e}")))?;
    if bytes.len() != SIGNATURE_BYTES {
        return Err(malformed(format!(
            "{} bytes, expected {SIGNATURE_BYTES}",
            bytes.len()
        )));
    }
    Ok(bytes)
}

/// The fields of the payload are such that it reads back one way only, and such that the agent can
/// check them: a subject without whitespace, an RFC 3339 `sent_at`, a lowercase hex SHA-256.
fn check_fields(subject: &str, sent_at: &str, config_sha256: &str) -> Result<(), String> {
    if subject.is_empty() || subject.chars().any(char::is_whitespace) {
        return Err("the subject must be a NATS subject: not empty, no whitespace".to_string());
    }
    if sent_at.contains('\n') {
        return Err("sent_at must not contain a line feed".to_string());
    }
    parse_rfc3339(sent_at).map_err(|e| format!("sent_at: {e}"))?;
    if !is_sha256_hex(config_sha256) {
        return Err(
            "config_sha256 must be the SHA-256 of the config as 64 lowercase hex digits"
                .to_string(),
        );
    }
    Ok(())
}

/// A key pair from a user seed, or why `seed` is not one. The seed never appears in the error.
fn user_pair_from_seed(seed: &str) -> Result<KeyPair, SignError> {
    let pair = KeyPair::from_seed(seed).map_err(|e| SignError::InvalidSeed {
        reason: if seed.starts_with('U') && KeyPair::from_public_key(seed).is_ok() {
            "this is a public key; signing needs the seed it was made from".to_string()
        } else {
            e.to_string()
        },
    })?;
    match pair.key_pair_type() {
        KeyPairType::User => Ok(pair),
        other => Err(SignError::NotUserSeed {
            kind: kind_name(&other).to_string(),
            prefix: seed.chars().take(2).collect(),
        }),
    }
}

fn kind_name(kind: &KeyPairType) -> &'static str {
    match kind {
        KeyPairType::Server => "server",
        KeyPairType::Cluster => "cluster",
        KeyPairType::Operator => "operator",
        KeyPairType::Account => "account",
        KeyPairType::User => "user",
        KeyPairType::Module => "module",
        KeyPairType::Service => "service",
        KeyPairType::Curve => "curve",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The test vector of docs/SECURITY.md: the user key made from 32 bytes of 0x2a.
    const SEED: &str = "SUACUKRKFIVCUKRKFIVCUKRKFIVCUKRKFIVCUKRKFIVCUKRKFIVCUKTGMM";
    const PUBLIC: &str = "UAMX62ZD4FWIKMWGVPEDR6WNL2TYTPQMO2ZJEAZUAON7VCZ5G2GWCXLM";
    const SUBJECT: &str = "ebb.node.web-1.push";
    const SENT_AT: &str = "2026-12-01T08:00:00.000Z";
    /// SHA-256 of the empty string.
    const SHA: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
    const SIGNATURE: &str =
        "YC9SBMmr0DOAYGrh0WVIdIhl92Ked4VW3iwYAeweyAExOxLVjPVMXA9xbvLDUV6ZYO9ptL85E1VaTTzqcJSoDA";
    /// The account key made from the same bytes.
    const ACCOUNT_SEED: &str = "SAACUKRKFIVCUKRKFIVCUKRKFIVCUKRKFIVCUKRKFIVCUKRKFIVCUKUVV4";
    const ACCOUNT_PUBLIC: &str = "AAMX62ZD4FWIKMWGVPEDR6WNL2TYTPQMO2ZJEAZUAON7VCZ5G2GWDTYT";

    fn keys(list: &[&str]) -> Vec<String> {
        list.iter().map(|k| k.to_string()).collect()
    }

    fn other_user() -> (String, String) {
        let pair = KeyPair::new_user();
        (pair.seed().unwrap(), pair.public_key())
    }

    #[test]
    fn the_payload_is_four_lines_without_a_trailing_line_feed() {
        assert_eq!(
            signing_payload(SUBJECT, SENT_AT, SHA),
            format!("ebb-push-v1\nebb.node.web-1.push\n2026-12-01T08:00:00.000Z\n{SHA}")
        );
    }

    #[test]
    fn the_test_vector_holds() {
        let pair = KeyPair::from_seed(SEED).unwrap();
        assert_eq!(pair.public_key(), PUBLIC);
        let signature = sign(SEED, SUBJECT, SENT_AT, SHA).unwrap();
        assert_eq!(signature, SIGNATURE);
        assert_eq!(signature.len(), SIGNATURE_CHARS);
        assert_eq!(
            verify(&keys(&[PUBLIC]), SUBJECT, SENT_AT, SHA, &signature),
            Ok(())
        );
    }

    #[test]
    fn a_signature_verifies_with_any_of_the_keys_that_made_it() {
        let (seed, public) = other_user();
        let signature = sign(&seed, "ebb.all.push", SENT_AT, SHA).unwrap();
        assert_eq!(
            verify(
                &keys(&[PUBLIC, &public]),
                "ebb.all.push",
                SENT_AT,
                SHA,
                &signature
            ),
            Ok(())
        );
        // A seed read with its line feed signs the same.
        assert_eq!(
            sign(&format!("{seed}\n"), "ebb.all.push", SENT_AT, SHA).unwrap(),
            signature
        );
    }

    #[test]
    fn a_foreign_key_does_not_verify() {
        let (seed, _) = other_user();
        let signature = sign(&seed, SUBJECT, SENT_AT, SHA).unwrap();
        let err = verify(&keys(&[PUBLIC]), SUBJECT, SENT_AT, SHA, &signature).unwrap_err();
        assert_eq!(
            err,
            VerifyError::NoKeyMatched {
                subject: SUBJECT.into()
            }
        );
        let message = err.to_string();
        assert!(message.contains("push.keys"), "{message}");
        assert!(
            !message.contains(PUBLIC),
            "never names the trusted keys: {message}"
        );
    }

    #[test]
    fn a_signature_holds_for_its_subject_only() {
        let signature = sign(SEED, SUBJECT, SENT_AT, SHA).unwrap();
        let trusted = keys(&[PUBLIC]);
        for subject in [
            "ebb.node.web-2.push",
            "ebb.group.web.push",
            "ebb.all.push",
            "ebb.node.web-1.reload",
            "other.node.web-1.push",
        ] {
            assert_eq!(
                verify(&trusted, subject, SENT_AT, SHA, &signature),
                Err(VerifyError::NoKeyMatched {
                    subject: subject.into()
                }),
                "{subject}"
            );
        }
        // And a group signature is no good on a node of the group.
        let group = sign(SEED, "ebb.group.web.push", SENT_AT, SHA).unwrap();
        assert!(verify(&trusted, "ebb.group.web.push", SENT_AT, SHA, &group).is_ok());
        assert!(verify(&trusted, SUBJECT, SENT_AT, SHA, &group).is_err());
    }

    #[test]
    fn a_signature_holds_for_its_sent_at_and_config_only() {
        let signature = sign(SEED, SUBJECT, SENT_AT, SHA).unwrap();
        let trusted = keys(&[PUBLIC]);
        // The same instant written otherwise is another payload.
        for sent_at in ["2026-12-01T08:00:00Z", "2026-12-01T08:00:01.000Z"] {
            assert!(verify(&trusted, SUBJECT, sent_at, SHA, &signature).is_err());
        }
        let mut tampered = SHA.to_string();
        tampered.replace_range(0..1, "f");
        assert_eq!(
            verify(&trusted, SUBJECT, SENT_AT, &tampered, &signature),
            Err(VerifyError::NoKeyMatched {
                subject: SUBJECT.into()
            })
        );
    }

    #[test]
    fn a_tampered_signature_does_not_verify() {
        let signature = sign(SEED, SUBJECT, SENT_AT, SHA).unwrap();
        let mut bytes = URL_SAFE_NO_PAD.decode(&signature).unwrap();
        bytes[10] ^= 1;
        let flipped = URL_SAFE_NO_PAD.encode(bytes);
        assert!(matches!(
            verify(&keys(&[PUBLIC]), SUBJECT, SENT_AT, SHA, &flipped),
            Err(VerifyError::NoKeyMatched { .. })
        ));
    }

    #[test]
    fn malformed_signatures_say_so() {
        let trusted = keys(&[PUBLIC]);
        let signature = sign(SEED, SUBJECT, SENT_AT, SHA).unwrap();
        let check = |s: &str| verify(&trusted, SUBJECT, SENT_AT, SHA, s).unwrap_err();
        assert_eq!(check(""), VerifyError::Empty);
        for bad in [
            format!("{signature}=="),
            format!("+{}", &signature[1..]),
            format!("/{}", &signature[1..]),
            signature[..85].to_string(),
            format!("{signature}A"),
            "!".repeat(86),
            "A".repeat(10_000),
        ] {
            let err = check(&bad);
            assert!(
                matches!(err, VerifyError::Malformed { .. }),
                "{bad}: {err:?}"
            );
            assert!(err.to_string().contains("base64url"), "{err}");
        }
        // Standard base64 (with + and /) of the same bytes is refused, not read leniently.
        let bytes = URL_SAFE_NO_PAD.decode(&signature).unwrap();
        let standard = base64::engine::general_purpose::STANDARD_NO_PAD.encode(bytes);
        if standard != signature {
            assert!(matches!(check(&standard), VerifyError::Malformed { .. }));
        }
    }

    #[test]
    fn no_keys_is_never_valid() {
        let signature = sign(SEED, SUBJECT, SENT_AT, SHA).unwrap();
        assert_eq!(
            verify(&[], SUBJECT, SENT_AT, SHA, &signature),
            Err(VerifyError::NoKeys)
        );
    }

    #[test]
    fn only_user_keys_verify() {
        // An account key over the same bytes has the same ed25519 key: it must still not count.
        let signature = sign(SEED, SUBJECT, SENT_AT, SHA).unwrap();
        let trusted = keys(&[ACCOUNT_PUBLIC, "not a key"]);
        assert!(matches!(
            verify(&trusted, SUBJECT, SENT_AT, SHA, &signature),
            Err(VerifyError::NoKeyMatched { .. })
        ));
    }

    #[test]
    fn fields_that_could_make_the_payload_ambiguous_are_refused() {
        let signature = sign(SEED, SUBJECT, SENT_AT, SHA).unwrap();
        let trusted = keys(&[PUBLIC]);
        let cases = [
            ("ebb.node.web-1.push\n2026", SENT_AT, SHA),
            ("", SENT_AT, SHA),
            ("ebb.node.web 1.push", SENT_AT, SHA),
            (SUBJECT, "2026-12-01T08:00:00.000Z\n", SHA),
            (SUBJECT, "yesterday", SHA),
            (SUBJECT, SENT_AT, &SHA[..63]),
            (
                SUBJECT,
                SENT_AT,
                "E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855",
            ),
        ];
        for (subject, sent_at, sha) in cases {
            assert!(
                matches!(
                    sign(SEED, subject, sent_at, sha),
                    Err(SignError::InvalidField(_))
                ),
                "{subject:?} {sent_at:?} {sha:?}"
            );
            assert!(
                matches!(
                    verify(&trusted, subject, sent_at, sha, &signature),
                    Err(VerifyError::InvalidField(_))
                ),
                "{subject:?} {sent_at:?} {sha:?}"
            );
        }
    }

    #[test]
    fn only_user_seeds_sign() {
        let err = sign(ACCOUNT_SEED, SUBJECT, SENT_AT, SHA).unwrap_err();
        assert!(matches!(err, SignError::NotUserSeed { .. }), "{err:?}");
        let message = err.to_string();
        assert!(
            message.contains("account") && message.contains("SA"),
            "{message}"
        );
        assert!(
            !message.contains(ACCOUNT_SEED),
            "never shows the seed: {message}"
        );

        let err = sign(PUBLIC, SUBJECT, SENT_AT, SHA).unwrap_err();
        assert!(err.to_string().contains("public key"), "{err}");
        let mut broken = SEED.to_string();
        broken.replace_range(10..11, "A");
        for bad in ["", "SU", broken.as_str()] {
            let err = sign(bad, SUBJECT, SENT_AT, SHA).unwrap_err();
            assert!(matches!(err, SignError::InvalidSeed { .. }), "{err:?}");
            assert!(!err.to_string().contains(SEED), "{err}");
        }
    }

    #[test]
    fn check_public_key_wants_a_user_public_key() {
        assert_eq!(check_public_key(PUBLIC), Ok(()));
        let err = check_public_key(ACCOUNT_PUBLIC).unwrap_err();
        assert!(matches!(err, KeyError::NotUser { .. }));
        assert!(err.to_string().contains("account"), "{err}");
        for bad in ["", "U", SEED, &PUBLIC[..55], &PUBLIC.to_lowercase()] {
            assert!(
                matches!(check_public_key(bad), Err(KeyError::Invalid { .. })),
                "{bad}"
            );
        }
        let mut typo = PUBLIC.to_string();
        typo.replace_range(20..21, "B");
        assert!(matches!(
            check_public_key(&typo),
            Err(KeyError::Invalid { .. })
        ));
    }

    #[test]
    fn seed_files_hold_one_user_seed() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        let good = write("push.nk", &format!("  {SEED}\n\n"));
        assert_eq!(read_seed_file(&good).unwrap(), SEED);

        let account = write("account.nk", ACCOUNT_SEED);
        assert!(matches!(
            read_seed_file(&account),
            Err(SignError::NotUserSeed { .. })
        ));
        let creds = write(
            "user.creds",
            &format!(
                "-----BEGIN NATS USER JWT-----\neyJ0eXAi\n------END NATS USER JWT------\n\n\
                 -----BEGIN USER NKEY SEED-----\n{SEED}\n------END USER NKEY SEED------\n"
            ),
        );
        let err = read_seed_file(&creds).unwrap_err();
        assert!(matches!(err, SignError::SeedFileContent { .. }), "{err:?}");
        assert!(err.to_string().contains(".creds"), "{err}");
        assert!(!err.to_string().contains(SEED), "{err}");
        let empty = write("empty.nk", " \n");
        assert!(matches!(
            read_seed_file(&empty),
            Err(SignError::SeedFileContent { .. })
        ));
        let missing = dir.path().join("missing.nk");
        let err = read_seed_file(&missing).unwrap_err();
        assert!(matches!(err, SignError::ReadSeedFile { .. }));
        assert!(err.to_string().contains("missing.nk"), "{err}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(10_000))]

        /// Whatever arrives as a signature or a subject, verification returns (never panics) and
        /// never accepts.
        #[test]
        fn random_signatures_never_verify(
            signature in prop_oneof![
                "[A-Za-z0-9_-]{86}",
                "[A-Za-z0-9_=+/-]{0,100}",
                any::<String>(),
                proptest::collection::vec(any::<u8>(), 64).prop_map(|b| URL_SAFE_NO_PAD.encode(b)),
            ],
            subject in prop_oneof![Just(SUBJECT.to_string()), "[a-z0-9.*>-]{1,40}", any::<String>()],
        ) {
            let trusted = keys(&[PUBLIC]);
            prop_assert!(verify(&trusted, &subject, SENT_AT, SHA, &signature).is_err());
        }
    }
}
