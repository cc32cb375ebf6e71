use serde::{Deserialize, Serialize};
use std::fmt;

/// The longest issuer id, node id, region or desk name accepted.
pub const ID_LEN_MAX: usize = 64;
/// The longest client reservation token accepted.
pub const TOKEN_LEN_MAX: usize = 128;
/// The largest amount or limit, in minor units: 2^53 - 1, so every amount is
/// exact in a JSON number read by any client (JavaScript included).
pub const AMOUNT_MAX: u64 = (1 << 53) - 1;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("{what} must not be empty")]
    Empty { what: &'static str },
    #[error("{what} is {len} bytes long; at most {max} are allowed")]
    TooLong {
        what: &'static str,
        len: usize,
        max: usize,
    },
    #[error("{what} may contain only letters, digits, '-', '_' and '.'; got {value:?}")]
    BadCharacter { what: &'static str, value: String },
}

fn validate(what: &'static str, value: &str, max: usize) -> Result<(), IdError> {
    if value.is_empty() {
        return Err(IdError::Empty { what });
    }
    if value.len() > max {
        return Err(IdError::TooLong {
            what,
            len: value.len(),
            max,
        });
    }
    let ok = value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if !ok {
        return Err(IdError::BadCharacter {
            what,
            value: value.to_string(),
        });
    }
    Ok(())
}

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident, $what:literal, $max:expr) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            pub fn new(value: impl Into<String>) -> Result<Self, IdError> {
                let value = value.into();
                validate($what, &value, $max)?;
                Ok($name(value))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(value: String) -> Result<Self, IdError> {
                $name::new(value)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

string_id!(
    /// An issuer (generally: any resource with a limit). All of an issuer's
    /// rows live in one bucket.
    IssuerId, "issuer_id", ID_LEN_MAX
);
string_id!(
    /// A region name such as `madrid`.
    Region, "region", ID_LEN_MAX
);
string_id!(
    /// A node (one replica host) such as `madrid-1`.
    NodeId, "node", ID_LEN_MAX
);
string_id!(
    /// A client-generated idempotency token. Scoped to the issuer it was used
    /// with: the decision and its token outcome live in the issuer's bucket.
    ReservationToken, "reservation_token", TOKEN_LEN_MAX
);

/// A reservation: `{issuer}:r{seq}`, where `seq` counts the issuer's
/// reservations. The issuer is part of the id so any gateway can route a
/// confirm, release or read without a global index.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ReservationId {
    issuer: IssuerId,
    seq: u64,
}

impl ReservationId {
    pub fn new(issuer: IssuerId, seq: u64) -> ReservationId {
        assert!(seq > 0, "reservation sequence numbers start at 1");
        ReservationId { issuer, seq }
    }

    pub fn issuer(&self) -> &IssuerId {
        &self.issuer
    }

    pub fn seq(&self) -> u64 {
        self.seq
    }

    pub fn parse(text: &str) -> Result<ReservationId, IdError> {
        let bad = || IdError::BadCharacter {
            what: "reservation_id",
            value: text.to_string(),
        };
        let (issuer, seq) = text.rsplit_once(":r").ok_or_else(bad)?;
        if seq.is_empty() || !seq.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let seq: u64 = seq.parse().map_err(|_| bad())?;
        if seq == 0 {
            return Err(bad());
        }
        Ok(ReservationId {
            issuer: IssuerId::new(issuer)?,
            seq,
        })
    }
}

impl TryFrom<String> for ReservationId {
    type Error = IdError;
    fn try_from(value: String) -> Result<Self, IdError> {
        ReservationId::parse(&value)
    }
}

impl From<ReservationId> for String {
    fn from(id: ReservationId) -> String {
        id.to_string()
    }
}

impl fmt::Display for ReservationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:r{}", self.issuer, self.seq)
    }
}

/// A logical bucket: the unit of placement. An issuer lives in exactly one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct BucketId(pub u32);

impl fmt::Display for BucketId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "bucket {}", self.0)
    }
}

/// An amount or limit in minor units (cents, seats, ...). Never a float;
/// arithmetic is checked and bounded by [`AMOUNT_MAX`].
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Amount(pub u64);

impl Amount {
    pub const ZERO: Amount = Amount(0);

    pub fn checked_add(self, other: Amount) -> Option<Amount> {
        self.0
            .checked_add(other.0)
            .filter(|v| *v <= AMOUNT_MAX)
            .map(Amount)
    }

    pub fn checked_sub(self, other: Amount) -> Option<Amount> {
        self.0.checked_sub(other.0).map(Amount)
    }

    pub fn saturating_sub(self, other: Amount) -> Amount {
        Amount(self.0.saturating_sub(other.0))
    }
}

impl fmt::Display for Amount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_validate_charset_and_length() {
        assert!(IssuerId::new("MUNI-77").is_ok());
        assert!(IssuerId::new("").is_err());
        assert!(IssuerId::new("a b").is_err());
        assert!(IssuerId::new("a:b").is_err());
        assert!(IssuerId::new("x".repeat(ID_LEN_MAX + 1)).is_err());
        assert!(ReservationToken::new("t".repeat(TOKEN_LEN_MAX)).is_ok());
    }

    #[test]
    fn reservation_id_round_trips() {
        let id = ReservationId::new(IssuerId::new("MUNI-77").unwrap(), 17);
        assert_eq!(id.to_string(), "MUNI-77:r17");
        assert_eq!(ReservationId::parse("MUNI-77:r17").unwrap(), id);
        for bad in [
            "MUNI-77",
            "MUNI-77:r",
            "MUNI-77:r0",
            ":r1",
            "a b:r1",
            "M:rx",
        ] {
            assert!(ReservationId::parse(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn amounts_are_checked_and_bounded() {
        assert_eq!(Amount(1).checked_add(Amount(2)), Some(Amount(3)));
        assert_eq!(Amount(AMOUNT_MAX).checked_add(Amount(1)), None);
        assert_eq!(Amount(1).checked_sub(Amount(2)), None);
    }
}
