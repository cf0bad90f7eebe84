//! A push's repair: the result of one attempt -> the next attempt, or the end.
//!
//! The primary runs a push as attempts (`push::with_repair` does the I/O). After each one,
//! [`Repair::next`] decides from what happened ([`Attempted`]) and the options (`--repair`,
//! `--min-replicas`):
//! - a replica that holds this very version already is published there: the chain forms again
//!   without it;
//! - a plain push refused as `version_exists` is asked again routed (the replica can compare
//!   digests then);
//! - a replica that is down when the chain forms is left out at once, reported `unreachable`
//!   (with repair, or when not every replica is required): the same push, nothing was sent yet;
//! - with repair, the replicas cut off by a dead one (or sent corrupt bytes by a node before
//!   them, or whose connection was lost) get one routed push that resumes from what each holds;
//!   the dead one is not waited for and keeps its first cause.
//!
//! [`Repair::finish`] then gives each replica of the push its outcome, in chain order.

use std::collections::HashMap;

use crate::error::{ErrorKind, NodeError};
use crate::wire::{Outcome, ReplicaReport};

/// What one attempt came to, as the repair sees it.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Attempted<'a> {
    /// The chain ran to its end: one report per replica of the attempt.
    Reported(&'a [ReplicaReport]),
    /// The attempt failed.
    Failed(Failed<'a>),
}

/// A failed attempt.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Failed<'a> {
    /// The node the error names, and its error, when it names one.
    pub node: Option<(&'a str, &'a NodeError)>,
    /// The failure as a whole (what every replica of the attempt is reported with when the
    /// push ends on it).
    pub error: &'a NodeError,
    /// The chain did not form: no chunk left the primary.
    pub at_start: bool,
    /// The node named holds this version already, with the same manifest.
    pub held: bool,
}

/// Why the push goes on with another attempt (for the log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Why {
    /// This node holds the version already: it is published there and left out.
    Held(String),
    /// A plain push was refused as `version_exists`: asked again routed.
    AskRouted,
    /// This node cannot be reached when the chain forms: left out, with this error.
    LeftOut(String, NodeError),
    /// These nodes were cut off (or sent corrupt bytes): one routed push that resumes them.
    Repair(Vec<String>),
}

/// What to do after an attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Step {
    /// Run another attempt, to [`Repair::chain`], routed when [`Repair::incremental`].
    Attempt(Why),
    /// Stop and call [`Repair::finish`] with the last attempt's reports, if it reported.
    Stop,
}

/// How the push ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Finish {
    /// Every replica of the push in chain order, with its outcome.
    pub replicas: Vec<ReplicaReport>,
    /// Replicas that held the version already (left out, published).
    pub already_held: Vec<String>,
    /// Every replica held it: nothing was sent (the push's report is an empty one). When no
    /// attempt reported and this is false, the last attempt's failure is the push's.
    pub nothing_sent: bool,
}

/// The repair's state over the attempts of one push.
#[derive(Debug, Clone)]
pub(crate) struct Repair {
    /// The push's replicas, in chain order.
    to: Vec<String>,
    /// `--repair`.
    repair: bool,
    /// Leave out a replica that is down when the chain forms (`--repair` or `--min-replicas`).
    leave_out_dead: bool,
    /// The replicas of the next attempt.
    chain: Vec<String>,
    /// Whether the next attempt is routed (incremental).
    incremental: bool,
    /// The known outcome of each replica so far.
    outcomes: HashMap<String, Outcome>,
    /// Some attempt reported.
    reported: bool,
    /// The attempts now repair a broken chain.
    repairing: bool,
    /// Replicas that held the version already.
    held: Vec<String>,
    /// A plain push was asked again routed once.
    asked_routed: bool,
    /// Attempts decided so far (bounded: each leaves out at least one replica but for the one
    /// that asks again routed and a replica whose lost connection is tried once more).
    rounds: usize,
}

impl Repair {
    /// The repair of a push to `to` (routed when `incremental`), with `--repair` and whether
    /// `--min-replicas` was given.
    pub(crate) fn new(to: Vec<String>, incremental: bool, repair: bool, min_replicas: bool) -> Self {
        Self {
            chain: to.clone(),
            to,
            repair,
            leave_out_dead: repair || min_replicas,
            incremental,
            outcomes: HashMap::new(),
            reported: false,
            repairing: false,
            held: Vec::new(),
            asked_routed: false,
            rounds: 0,
        }
    }

    /// The replicas of the next attempt, in chain order.
    pub(crate) fn chain(&self) -> &[String] {
        &self.chain
    }

    /// Whether the next attempt is routed (incremental).
    pub(crate) fn incremental(&self) -> bool {
        self.incremental
    }

    /// Decides after an attempt to [`Repair::chain`].
    pub(crate) fn next(&mut self, attempt: Attempted<'_>) -> Step {
        if self.rounds > 2 * self.to.len() {
            return Step::Stop;
        }
        self.rounds += 1;
        let chain = self.chain.clone();
        let cut_off = match attempt {
            Attempted::Reported(reports) => {
                self.record(reports);
                if !self.repair {
                    return Step::Stop;
                }
                // Cut off: not reached because the chain broke before them, or sent corrupt
                // bytes by a node before them (those are fetched again from the primary; what
                // they verified and journaled is kept). A lost connection is tried once more
                // too: a replica that went away after refusing a corrupt chunk looks the same
                // from upstream as a dead one, and a dead one is refused at once and left out.
                reports
                    .iter()
                    .filter(|rep| {
                        matches!(&rep.outcome, Outcome::Failed(e)
                            if matches!(e.kind, ErrorKind::Aborted | ErrorKind::DigestMismatch | ErrorKind::ConnectionLost))
                    })
                    .map(|rep| rep.node.clone())
                    .collect()
            }
            Attempted::Failed(f) => match self.failed(&chain, f) {
                Ok(step) => return step,
                Err(cut_off) => cut_off,
            },
        };
        // Someone must have failed for real: a chain where every failure is "aborted" (e.g.
        // the push was cancelled) is not repaired.
        let dead = chain
            .iter()
            .any(|n| matches!(self.outcomes.get(n), Some(Outcome::Failed(e)) if e.kind != ErrorKind::Aborted));
        if cut_off.is_empty() || !dead {
            return Step::Stop;
        }
        self.chain = cut_off.clone();
        self.incremental = true;
        self.repairing = true;
        Step::Attempt(Why::Repair(cut_off))
    }

    /// A failed attempt: the step to take (`Ok`), or the replicas to repair (`Err`, possibly
    /// none).
    fn failed(&mut self, chain: &[String], f: Failed<'_>) -> Result<Step, Vec<String>> {
        let named = f.node.filter(|(node, _)| chain.iter().any(|n| n == node));
        match named {
            // A replica holds this very version already (same manifest): it is published there;
            // form the chain without it (nothing was sent yet).
            Some((node, _)) if f.held => {
                self.outcomes.insert(node.to_owned(), Outcome::Published);
                self.held.push(node.to_owned());
                self.chain.retain(|n| n != node);
                return Ok(if self.chain.is_empty() { Step::Stop } else { Step::Attempt(Why::Held(node.to_owned())) });
            }
            _ => {}
        }
        match f.node {
            // A plain push carries no digests, so a replica that has published this version
            // cannot tell whether it holds the same bytes: ask again as a routed push (hashed
            // first), which it can compare (and which resumes from anything staged).
            Some((_, error))
                if f.at_start
                    && !f.held
                    && error.kind == ErrorKind::VersionExists
                    && !self.incremental
                    && !self.asked_routed =>
            {
                self.asked_routed = true;
                self.incremental = true;
                return Ok(Step::Attempt(Why::AskRouted));
            }
            _ => {}
        }
        match named {
            // The chain did not form because a replica in it is down: form it without that one,
            // at once, as the same push (nothing was sent yet).
            Some((node, error))
                if f.at_start && self.leave_out_dead && chain.len() > 1 && down_at_start(error.kind) =>
            {
                let known = matches!(self.outcomes.get(node), Some(Outcome::Failed(e)) if e.kind != ErrorKind::Aborted);
                let left_out = NodeError::new(ErrorKind::Unreachable, error.message.clone());
                if !known {
                    self.outcomes.insert(node.to_owned(), Outcome::Failed(left_out));
                }
                self.chain.retain(|n| n != node);
                return Ok(Step::Attempt(Why::LeftOut(node.to_owned(), error.clone())));
            }
            // A replica broke before the chain could report: the first one mid-push, or, while
            // repairing, any one (also one that cannot be reached any more). Go on with the
            // others.
            Some((node, error))
                if self.repair
                    && chain.len() > 1
                    && ((node == chain[0] && matches!(error.kind, ErrorKind::ConnectionLost | ErrorKind::Stalled))
                        || (self.repairing
                            && matches!(
                                error.kind,
                                ErrorKind::ConnectionLost | ErrorKind::Stalled | ErrorKind::Unreachable
                            ))) =>
            {
                // The first real cause stands (a dead replica's lost connection, not the refused
                // connect of the retry).
                let known = matches!(self.outcomes.get(node), Some(Outcome::Failed(e))
                    if !matches!(e.kind, ErrorKind::Aborted | ErrorKind::DigestMismatch));
                if !known {
                    self.outcomes.insert(node.to_owned(), Outcome::Failed(error.clone()));
                }
                return Err(chain.iter().filter(|n| *n != node).cloned().collect());
            }
            _ => {}
        }
        if !self.reported && self.outcomes.is_empty() {
            // Nothing decided yet: the push fails with this attempt's error.
            return Ok(Step::Stop);
        }
        for n in chain {
            self.outcomes.insert(n.clone(), Outcome::Failed(f.error.clone()));
        }
        Err(Vec::new())
    }

    fn record(&mut self, reports: &[ReplicaReport]) {
        self.reported = true;
        for rep in reports {
            self.outcomes.insert(rep.node.clone(), rep.outcome.clone());
        }
    }

    /// The push's end: `last` holds the last attempt's reports when it reported.
    pub(crate) fn finish(mut self, last: Option<&[ReplicaReport]>) -> Finish {
        if let Some(reports) = last {
            self.record(reports);
        }
        let replicas = self
            .to
            .iter()
            .map(|n| ReplicaReport {
                node: n.clone(),
                outcome: self.outcomes.remove(n).unwrap_or_else(|| {
                    Outcome::Failed(NodeError::new(ErrorKind::Aborted, "no report for this replica"))
                }),
            })
            .collect();
        let nothing_sent = self.chain.is_empty();
        Finish { replicas, already_held: self.held, nothing_sent }
    }
}

/// Failures of a replica when the chain forms that mean it is down (not that it refused): the
/// connect refused or timed out, or the connection lost or silent before it answered.
pub(crate) fn down_at_start(kind: ErrorKind) -> bool {
    matches!(kind, ErrorKind::Unreachable | ErrorKind::ConnectionLost | ErrorKind::Stalled)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn to() -> Vec<String> {
        ["a", "b", "c"].map(String::from).to_vec()
    }

    fn failed(node: &str, kind: ErrorKind) -> ReplicaReport {
        ReplicaReport::failed(node, NodeError::new(kind, "x"))
    }

    fn published(node: &str) -> ReplicaReport {
        ReplicaReport { node: node.into(), outcome: Outcome::Published }
    }

    #[test]
    fn a_dead_middle_node_gets_the_cut_off_ones_one_routed_repair() {
        let mut r = Repair::new(to(), false, true, false);
        let first =
            [failed("a", ErrorKind::Aborted), failed("b", ErrorKind::ConnectionLost), failed("c", ErrorKind::Aborted)];
        assert_eq!(r.next(Attempted::Reported(&first)), Step::Attempt(Why::Repair(to())));
        assert!(r.incremental());
        // b is down now: left out at once, keeping its first cause.
        let refused = NodeError::new(ErrorKind::Unreachable, "refused");
        let step = r.next(Attempted::Failed(Failed {
            node: Some(("b", &refused)),
            error: &refused,
            at_start: true,
            held: false,
        }));
        assert_eq!(step, Step::Attempt(Why::LeftOut("b".into(), refused.clone())));
        assert_eq!(r.chain(), ["a", "c"]);
        let last = [published("a"), published("c")];
        assert_eq!(r.next(Attempted::Reported(&last)), Step::Stop);
        let end = r.finish(Some(&last));
        assert_eq!(end.replicas, vec![published("a"), failed("b", ErrorKind::ConnectionLost), published("c")]);
        assert!(!end.nothing_sent);
    }

    #[test]
    fn without_repair_the_first_report_stands() {
        let mut r = Repair::new(to(), false, false, false);
        let first = [published("a"), failed("b", ErrorKind::ConnectionLost), failed("c", ErrorKind::Aborted)];
        assert_eq!(r.next(Attempted::Reported(&first)), Step::Stop);
        assert_eq!(r.finish(None).replicas, first.to_vec());
    }

    #[test]
    fn a_cancelled_push_is_not_repaired() {
        let mut r = Repair::new(to(), false, true, false);
        let all = [failed("a", ErrorKind::Aborted), failed("b", ErrorKind::Aborted), failed("c", ErrorKind::Aborted)];
        assert_eq!(r.next(Attempted::Reported(&all)), Step::Stop);
    }

    #[test]
    fn a_failure_before_anything_was_decided_is_the_push_s() {
        let mut r = Repair::new(to(), false, true, false);
        let e = NodeError::new(ErrorKind::Unauthorized, "no");
        let f = Failed { node: Some(("b", &e)), error: &e, at_start: true, held: false };
        assert_eq!(r.next(Attempted::Failed(f)), Step::Stop);
        let end = r.finish(None);
        assert!(!end.nothing_sent, "the caller returns the attempt's error");
    }

    #[test]
    fn attempts_are_bounded() {
        let mut r = Repair::new(to(), false, true, false);
        let lost = [published("a"), failed("b", ErrorKind::ConnectionLost), published("c")];
        let mut n = 0;
        while r.next(Attempted::Reported(&lost)) != Step::Stop {
            n += 1;
        }
        assert_eq!(n, 2 * 3 + 1);
    }
}
