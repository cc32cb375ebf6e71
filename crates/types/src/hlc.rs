use crate::WallMs;
use serde::{Deserialize, Serialize};
use std::fmt;

/// A hybrid logical clock reading: wall-clock milliseconds plus a logical
/// counter that orders events within one millisecond (or while the wall clock
/// lags a timestamp already seen). Totally ordered.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Timestamp {
    pub wall_ms: u64,
    pub logical: u32,
}

impl Timestamp {
    pub const ZERO: Timestamp = Timestamp {
        wall_ms: 0,
        logical: 0,
    };

    pub fn from_wall_ms(wall_ms: u64) -> Timestamp {
        Timestamp {
            wall_ms,
            logical: 0,
        }
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.wall_ms, self.logical)
    }
}

/// A hybrid logical clock. Pure: the caller passes the physical time in, so
/// cores and the simulator drive it the same way.
///
/// Invariant: every reading is strictly greater than every earlier reading and
/// every timestamp passed to `observe`.
#[derive(Clone, Debug, Default)]
pub struct Hlc {
    last: Timestamp,
}

impl Hlc {
    pub fn new() -> Hlc {
        Hlc::default()
    }

    /// The newest timestamp issued or observed.
    pub fn last(&self) -> Timestamp {
        self.last
    }

    /// A fresh timestamp for a local event at wall time `wall`.
    pub fn now(&mut self, wall: WallMs) -> Timestamp {
        let now_ms = wall.as_millis();
        let next = if now_ms > self.last.wall_ms {
            Timestamp::from_wall_ms(now_ms)
        } else {
            Timestamp {
                wall_ms: self.last.wall_ms,
                logical: self
                    .last
                    .logical
                    .checked_add(1)
                    .expect("HLC logical overflow"),
            }
        };
        assert!(
            next > self.last,
            "HLC went backwards: {next} <= {}",
            self.last
        );
        self.last = next;
        next
    }

    /// Fold in a timestamp received from another node so later readings order
    /// after it.
    pub fn observe(&mut self, remote: Timestamp) {
        if remote > self.last {
            self.last = remote;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::WallMs;

    #[test]
    fn readings_are_strictly_increasing_even_when_wall_clock_stalls() {
        let mut hlc = Hlc::new();
        let a = hlc.now(WallMs::from_millis(100));
        let b = hlc.now(WallMs::from_millis(100));
        let c = hlc.now(WallMs::from_millis(99));
        let d = hlc.now(WallMs::from_millis(101));
        assert!(a < b && b < c && c < d);
        assert_eq!(d, Timestamp::from_wall_ms(101));
    }

    #[test]
    fn observed_timestamps_order_before_later_readings() {
        let mut hlc = Hlc::new();
        hlc.observe(Timestamp {
            wall_ms: 500,
            logical: 7,
        });
        let next = hlc.now(WallMs::from_millis(10));
        assert_eq!(
            next,
            Timestamp {
                wall_ms: 500,
                logical: 8
            }
        );
    }
}
