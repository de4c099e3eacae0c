//! The protocol's `config_sha256`: lowercase hex SHA-256 of a config's exact bytes. Shared by the
//! supervision code, the node and `ebb ctl`, so all three hash the same way.

use sha2::{Digest, Sha256};

pub fn sha256_hex(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

#[cfg(test)]
mod tests {
    #[test]
    fn is_lowercase_hex_of_the_bytes() {
        assert_eq!(
            super::sha256_hex(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
