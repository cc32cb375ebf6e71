//! Two clocks, two types (DESIGN.md §5, "Two clocks").
//!
//! [`MonoMs`] is a reading of a monotonic clock: it never steps, its origin
//! is arbitrary (per process), and it only measures how much time passed.
//! Leases, timeouts, retransmits, replication lag and drains run on it.
//! [`WallMs`] is a reading of the wall clock (Unix milliseconds): it can
//! step forward or back at any moment (an operator, NTP, a resumed VM).
//! Only the hybrid logical clock and closed timestamps use it.
//!
//! Neither exposes its integer, and neither converts into the other, so a
//! lease cannot be computed from wall time by accident. Cores take both as
//! a [`Now`]; the node reads them from `Instant` and `SystemTime`, the
//! simulator from clocks it steps independently.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Milliseconds on a monotonic clock with an arbitrary origin.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct MonoMs(u64);

impl MonoMs {
    /// Never a reading: runtimes start their clocks at 1 or later, so zero
    /// can stand for "none" on the wire.
    pub const ZERO: MonoMs = MonoMs(0);
    pub const MAX: MonoMs = MonoMs(u64::MAX);

    pub const fn from_millis(ms: u64) -> MonoMs {
        MonoMs(ms)
    }

    pub const fn as_millis(self) -> u64 {
        self.0
    }

    /// Milliseconds from `earlier` to `self` (0 when `earlier` is later).
    pub fn since(self, earlier: MonoMs) -> u64 {
        self.0.saturating_sub(earlier.0)
    }

    /// `ms` later (saturating).
    pub fn plus(self, ms: u64) -> MonoMs {
        MonoMs(self.0.saturating_add(ms))
    }
}

impl fmt::Display for MonoMs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "mono {} ms", self.0)
    }
}

/// Milliseconds since the Unix epoch on the wall clock: for timestamps only.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct WallMs(u64);

impl WallMs {
    pub const fn from_millis(ms: u64) -> WallMs {
        WallMs(ms)
    }

    pub const fn as_millis(self) -> u64 {
        self.0
    }
}

impl fmt::Display for WallMs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "wall {} ms", self.0)
    }
}

/// Both clocks, read together at one instant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Now {
    pub mono: MonoMs,
    pub wall: WallMs,
}

impl Now {
    pub fn new(mono: MonoMs, wall: WallMs) -> Now {
        assert!(mono > MonoMs::ZERO, "monotonic readings start at 1");
        Now { mono, wall }
    }

    /// Both clocks at `ms` (tests and scenarios whose clocks agree).
    pub fn both(ms: u64) -> Now {
        Now::new(MonoMs::from_millis(ms), WallMs::from_millis(ms))
    }
}
