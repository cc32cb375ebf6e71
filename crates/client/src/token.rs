//! Reservation tokens and the checks the client makes before sending: the
//! same rules as the server's (`harbor_types::ids`), so a bad id fails here
//! with a clear message instead of after a round trip, and never ends up in
//! a URL path unescaped.

use crate::Error;

/// The longest issuer id, desk or trader name the server accepts.
pub const ID_LEN_MAX: usize = 64;
/// The longest reservation token the server accepts.
pub const TOKEN_LEN_MAX: usize = 128;
/// The largest amount or limit, in minor units: 2^53 - 1.
pub const AMOUNT_MAX: u64 = (1 << 53) - 1;
/// The longest hold, in milliseconds (7 days).
pub const HOLD_TTL_MS_MAX: u64 = 7 * 24 * 60 * 60 * 1000;

const BASE64URL: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// A fresh reservation token: `hc-` and 128 random bits in unpadded
/// base64url (22 characters), so only letters, digits, `-` and `_`, which
/// the server accepts and URLs carry as they are.
pub fn new_reservation_token() -> String {
    let bits = u128::from_le_bytes(random_bytes());
    let mut token = String::with_capacity(25);
    token.push_str("hc-");
    for i in 0..22 {
        // 22 groups of 6 bits cover the 128 (the last group has 2).
        token.push(BASE64URL[((bits >> (6 * i)) & 63) as usize] as char);
    }
    token
}

pub(crate) fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    // The OS random source fails only on a broken system; nothing sensible
    // can go on without it (rand's thread_rng panics alike).
    getrandom::fill(&mut bytes).expect("the operating system's random source failed");
    bytes
}

/// An id the server accepts: 1 to `max` bytes of letters, digits, `-`, `_`
/// and `.`.
pub(crate) fn check_id(what: &str, value: &str, max: usize) -> Result<(), Error> {
    if value.is_empty() {
        return Err(Error::InvalidInput(format!("{what} must not be empty")));
    }
    if value.len() > max {
        return Err(Error::InvalidInput(format!(
            "{what} is {} bytes long; at most {max} are allowed",
            value.len()
        )));
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(Error::InvalidInput(format!(
            "{what} may contain only letters, digits, '-', '_' and '.'; got {value:?}"
        )));
    }
    Ok(())
}

/// `ISSUER:rN` with N >= 1.
pub(crate) fn check_reservation_id(value: &str) -> Result<(), Error> {
    let bad = || {
        Error::InvalidInput(format!(
            "reservation_id must look like ISSUER:r17, got {value:?}"
        ))
    };
    let (issuer, seq) = value.rsplit_once(":r").ok_or_else(bad)?;
    check_id("the issuer part of reservation_id", issuer, ID_LEN_MAX)?;
    match seq.parse::<u64>() {
        Ok(n) if n > 0 && seq.bytes().all(|b| b.is_ascii_digit()) => Ok(()),
        _ => Err(bad()),
    }
}

/// Desk and trader: 1 to 64 bytes of printable text.
pub(crate) fn check_label(what: &str, value: &str) -> Result<(), Error> {
    if value.is_empty() || value.len() > ID_LEN_MAX || value.chars().any(char::is_control) {
        return Err(Error::InvalidInput(format!(
            "{what} must be 1 to {ID_LEN_MAX} bytes of printable text"
        )));
    }
    Ok(())
}

pub(crate) fn check_amount(what: &str, value: u64, min: u64) -> Result<(), Error> {
    if value < min || value > AMOUNT_MAX {
        return Err(Error::InvalidInput(format!(
            "{what} must be an integer from {min} to {AMOUNT_MAX} (minor units), got {value}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservation_ids_are_checked() {
        assert!(check_reservation_id("MUNI-77:r17").is_ok());
        for bad in [
            "MUNI-77",
            "MUNI-77:r",
            "MUNI-77:r0",
            ":r1",
            "a b:r1",
            "M:rx",
            "M:r+1",
        ] {
            assert!(check_reservation_id(bad).is_err(), "{bad:?} passed");
        }
    }

    #[test]
    fn ids_and_labels_are_checked() {
        assert!(check_id("issuer_id", "MUNI-77", ID_LEN_MAX).is_ok());
        assert!(check_id("issuer_id", "a/b", ID_LEN_MAX).is_err());
        assert!(check_id("issuer_id", &"x".repeat(65), ID_LEN_MAX).is_err());
        assert!(check_label("desk", "madrid rates").is_ok());
        assert!(check_label("desk", "a\nb").is_err());
        assert!(check_amount("amount", 0, 1).is_err());
        assert!(check_amount("amount", AMOUNT_MAX + 1, 1).is_err());
    }
}
