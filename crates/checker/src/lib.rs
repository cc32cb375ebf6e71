//! The history checker (DESIGN.md §11): reads what clients saw — a JSON-lines
//! history of invocations and completions, leader changes and the converged
//! final state — and checks Harbor's promises on it, one [`Property`] per
//! promise.
//!
//! The client oracle is Jepsen's: `ok` means it happened, `fail` means it
//! definitely did not, and `info` (a timeout, a lost connection) or a missing
//! completion means *unknown* — such an operation may or may not have taken
//! effect and is never treated as failed.
//!
//! Pure: parsing from a string or a `BufRead`, no clocks, no other IO. The
//! same crate writes histories ([`HistoryRecorder`], [`HistoryLine`]), so
//! producers and the checker share one definition of the format
//! (`docs/history-format.md`).
//!
//! ```
//! use harbor_checker::{check, Call, History, HistoryRecorder, Reply};
//! use harbor_types::{Amount, IssuerId, Region};
//!
//! let mut rec = HistoryRecorder::new();
//! let register = Call::RegisterIssuer {
//!     issuer_id: IssuerId::new("MUNI-77").unwrap(),
//!     home_region: Region::new("madrid").unwrap(),
//!     limit: Amount(1000),
//! };
//! let op = rec.invoke(10, "c1", register);
//! rec.ok(20, op, Reply::RegisterIssuer { commit_token: "shard3@g1:1".parse().unwrap() });
//! let text = rec.to_jsonl(); // one JSON object per line
//!
//! let report = check(&History::parse(&text).unwrap());
//! // The issuer acknowledged above has no final line: its state vanished.
//! assert_eq!(report.violations[0].property, "acknowledged_writes_survive");
//! ```

mod format;
mod history;
mod properties;
mod recorder;

#[cfg(test)]
mod testkit;

pub use format::{
    BucketEvent, BucketLine, Call, Consistency, ErrorLine, ErrorReply, FinalLine, FinalReservation,
    FinalToken, Function, HistoryLine, InvokeLine, LeaderLine, LookupStatus, LostLine, OkLine,
    Reply, ReservationStatus, ServedBy, TokenStatus, LINE_TYPES,
};
pub use history::{AtLine, Completion, History, HistoryError, Moment, Op, OpResult};
pub use properties::{
    AcknowledgedWritesSurvive, BoundedReads, FailedMeansNotApplied, NeverOversold,
    OneLeaderPerGeneration, OneOwnerPerBucket, SessionReads, StrongReadsNotStale,
    TokenSingleReservation, BOUNDED_STALENESS_MS_DEFAULT,
};
pub use recorder::HistoryRecorder;

use std::fmt;

/// A promise broken by the history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// The [`Property::name`] that found it.
    pub property: &'static str,
    /// The promise it guards, in words.
    pub promise: &'static str,
    /// What was seen, with the values needed to debug it.
    pub detail: String,
    /// The operations involved (op ids).
    pub ops: Vec<u64>,
}

impl Violation {
    pub fn new(property: &(impl Property + ?Sized), detail: String, ops: Vec<u64>) -> Violation {
        Violation {
            property: property.name(),
            promise: property.promise(),
            detail,
            ops,
        }
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.property, self.detail)?;
        if !self.ops.is_empty() {
            let ops: Vec<String> = self.ops.iter().map(u64::to_string).collect();
            write!(f, " [ops {}]", ops.join(", "))?;
        }
        write!(f, " (promise: {})", self.promise)
    }
}

/// What one property found: its violations and how many items it examined,
/// so a report can tell "nothing wrong" from "nothing checked".
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Verdict {
    pub items_checked: usize,
    pub violations: Vec<Violation>,
}

/// One checked promise.
pub trait Property {
    /// A short snake_case name, e.g. `never_oversold`.
    fn name(&self) -> &'static str;
    /// The promise this property guards, in one sentence.
    fn promise(&self) -> &'static str;
    /// Examines the history.
    fn verdict(&self, h: &History) -> Verdict;
    /// The violations only.
    fn check(&self, h: &History) -> Vec<Violation> {
        self.verdict(h).violations
    }
}

/// Every property, in the order of DESIGN.md §11.
pub fn all_properties() -> Vec<Box<dyn Property>> {
    vec![
        Box::new(TokenSingleReservation),
        Box::new(NeverOversold),
        Box::new(AcknowledgedWritesSurvive),
        Box::new(FailedMeansNotApplied),
        Box::new(StrongReadsNotStale),
        Box::new(SessionReads),
        Box::new(BoundedReads),
        Box::new(OneLeaderPerGeneration),
        Box::new(OneOwnerPerBucket),
    ]
}

/// The result of running every property.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub violations: Vec<Violation>,
    /// Property name → items it examined.
    pub checked: Vec<(&'static str, usize)>,
}

impl Report {
    pub fn is_ok(&self) -> bool {
        self.violations.is_empty()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (name, items) in &self.checked {
            let broken = self.violations.iter().filter(|v| v.property == *name);
            writeln!(f, "{name}: {items} checked, {} violated", broken.count())?;
        }
        for violation in &self.violations {
            writeln!(f, "VIOLATION {violation}")?;
        }
        Ok(())
    }
}

/// Runs every property of [`all_properties`] on the history.
pub fn check(h: &History) -> Report {
    let mut report = Report::default();
    for property in all_properties() {
        let verdict = property.verdict(h);
        report
            .checked
            .push((property.name(), verdict.items_checked));
        report.violations.extend(verdict.violations);
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::*;

    #[test]
    fn a_report_names_every_property_and_each_violation() {
        let mut s = Script::new();
        s.ok("c1", register("A", 100), registered("shard1@g1:1"));
        let report = check(&s.history());
        assert!(!report.is_ok());
        assert_eq!(report.checked.len(), all_properties().len());
        let text = report.to_string();
        assert!(
            text.contains("acknowledged_writes_survive: 1 checked, 1 violated"),
            "{text}"
        );
        assert!(
            text.contains("never_oversold: 0 checked, 0 violated"),
            "{text}"
        );
        assert!(
            text.contains(
                "VIOLATION acknowledged_writes_survive: acknowledged register_issuer of A \
                 but the issuer has no final state [ops 1] (promise: an acknowledged write"
            ),
            "{text}"
        );
    }
}
