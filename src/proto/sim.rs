//! A whole chain in one process: [`NodeMachine`]s wired through a simulated network.
//!
//! Quinn's model: no sockets, no threads, no sleeps. Time is a virtual clock that jumps to the
//! next scheduled event; a seeded RNG picks how long reads, verifies and writes take (so chunks
//! become ready out of order, as they may) while every link keeps its frames in order (TCP).
//! What the sim does is what the session does with the machines' actions, made small:
//! - a link carries at most [`WINDOW`] frames; a sender's further sends wait in its queue, and a
//!   receiver takes a chunk off its link only into a free pool slot (backpressure);
//! - a hop of several lanes (`push --lanes`) is that many links downstream, each in order, with
//!   its own jitter and pace (so chunks arrive out of order across lanes): the primary hands each
//!   chunk to the lane with room, a relay forwards it on the lane it came on, END goes on lane 0,
//!   a receiver acts on END once every chunk is here and leases slots by `proto::lanes`;
//! - the HELLO goes down the chain and every replica runs [`admission`] on it;
//! - a hop's deadline is [`stall::HopStall`], ticked with the virtual clock;
//! - the primary runs attempts as [`repair::Repair`] says, resuming replicas from their journals
//!   over a routed chain ([`route`]).
//!
//! It checks the machines' invariants as it goes: a slot is released exactly once and only
//! after it was taken, and an ACK never covers a chunk some node from the acker to the tail
//! stores and has not written.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use super::admission::{self, Peer, Policy};
use super::lanes::{EndSeen, may_lease};
use super::repair::{Attempted, Failed, Repair, Step};
use super::route::{self, Route};
use super::stall::{HopStall, Tick, hop_limit};
use super::{Action, Event, NodeMachine, Role};
use crate::error::{ErrorKind, NodeError};
use crate::manifest::Manifest;
use crate::pool::SlotId;
use crate::transport::Transport;
use crate::wire::{Grant, Hello, HelloFlags, Mode, Outcome, ReplicaReport};

/// Frames a link holds in flight.
const WINDOW: usize = 2;
/// Pool slots per node.
const SLOTS: u16 = 4;
/// One-way latency of every link.
const LATENCY: Duration = Duration::from_micros(200);
/// How often the nodes look at their hop deadlines.
const TICK: Duration = Duration::from_millis(100);

/// splitmix64: a seeded, reproducible source of delays.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A delay of 10 to 1000 µs.
    fn delay(&mut self) -> Duration {
        Duration::from_micros(10 + self.next() % 990)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Frame {
    Chunk(u64),
    End,
    Ack(u64),
    Result(Vec<ReplicaReport>),
}

/// A replica as it outlives pushes: its serve policy, its journal, what it published.
struct Replica {
    name: String,
    max_chain: usize,
    require_encrypt: bool,
    alive: bool,
    /// Takes nothing any more (its process hangs).
    hung: bool,
    /// Chunks journaled (written) for the version being pushed.
    journal: BTreeSet<u64>,
    published: bool,
    /// Chunks that arrived here, per attempt.
    arrived: Vec<u64>,
    /// The journal at the start of each attempt.
    before: Vec<BTreeSet<u64>>,
    /// Goes wrong after this many chunks have arrived here.
    fault: Option<(u64, Fault)>,
}

/// One node's part in one attempt.
struct Node {
    /// Index into `Sim::replicas` (None: the primary).
    replica: Option<usize>,
    machine: NodeMachine,
    route: Route,
    free: Vec<SlotId>,
    held: BTreeSet<SlotId>,
    /// Sends waiting for room on the link downstream: the frames any lane may take (the
    /// primary's, taken in order; END only by lane 0), then each lane's own (a relay's).
    queue: VecDeque<Frame>,
    lane_queues: Vec<VecDeque<Frame>>,
    /// The lane each chunk came on (relays forward it on the same one).
    lane_of: BTreeMap<u64, usize>,
    /// The next chunk each lane upstream may carry.
    lane_next: Vec<u64>,
    /// Chunks sent on each lane downstream.
    lane_chunks: Vec<u64>,
    /// Chunks that arrived from upstream, and how many will.
    arrived: u64,
    expected: u64,
    end: EndSeen,
    stall: HopStall,
    acks: Vec<u64>,
    /// The session is over (finished, aborted, or its upstream went away).
    done: bool,
    /// The primary reads chunks in this order.
    next_read: u64,
}

enum Ev {
    /// A local operation of node `node` completed.
    Local(usize, Event),
    /// A frame may have arrived at the end of link `link` (downstream of node `link` when
    /// `down`, else upstream of node `link + 1`).
    Arrive {
        link: usize,
        down: bool,
    },
    /// Node `n`'s connection downstream broke (its sends are cleared first).
    Lost(usize, NodeError),
    Tick,
}

/// What a replica does wrong, after this many chunks arrived at it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// Its process dies: its connections break.
    Die,
    /// It takes nothing more, and says nothing.
    Hang,
    /// The chunk that arrives then has bytes that do not match its digest (once).
    Corrupt,
    /// The lane it arrived on breaks (the connection between it and its upstream).
    CutLane,
}

/// One attempt's end at the primary.
type AttemptResult = Result<Vec<ReplicaReport>, (String, NodeError, bool)>;

struct Sim {
    base: Instant,
    now: Duration,
    rng: Rng,
    events: BTreeMap<(Duration, u64), Ev>,
    order: u64,
    replicas: Vec<Replica>,
    total: u64,
    manifest: Manifest,
    hop_timeout: Duration,
    /// The attempt's nodes, primary first.
    nodes: Vec<Node>,
    /// Link i, lane k: frames between node i and node i + 1, each with its arrival time.
    down: Vec<Vec<VecDeque<(Duration, Frame)>>>,
    /// Lanes per hop; the least time between two frames on each lane (its pace).
    lanes: usize,
    pace: Vec<Duration>,
    /// Leases slots by `proto::lanes` (off: any free slot, to show what the rule prevents).
    lease_rule: bool,
    /// Pool slots per node.
    slots: u16,
    up: Vec<VecDeque<(Duration, Frame)>>,
    /// The HELLO each replica received, by replica index, per attempt.
    hellos: Vec<(usize, Hello)>,
    /// The attempt's end at the primary, once there.
    result: Option<AttemptResult>,
    /// Each attempt's chain, and whether it was routed.
    attempts: Vec<(Vec<String>, bool)>,
}

impl Sim {
    fn new(seed: u64, replicas: &[&str], total: u64) -> Self {
        let size = total * u64::from(crate::wire::MIN_CHUNK);
        let manifest = Manifest::plan_for_files(crate::wire::MIN_CHUNK, &[("w.bin", size)]).unwrap().0;
        assert_eq!(manifest.chunk_count(), total);
        Self {
            base: Instant::now(),
            now: Duration::ZERO,
            rng: Rng(seed),
            events: BTreeMap::new(),
            order: 0,
            replicas: replicas
                .iter()
                .map(|n| Replica {
                    name: (*n).to_owned(),
                    max_chain: 16,
                    require_encrypt: false,
                    alive: true,
                    hung: false,
                    journal: BTreeSet::new(),
                    published: false,
                    arrived: Vec::new(),
                    fault: None,
                    before: Vec::new(),
                })
                .collect(),
            total,
            manifest,
            hop_timeout: Duration::from_secs(10),
            nodes: Vec::new(),
            down: Vec::new(),
            lanes: 1,
            pace: vec![Duration::ZERO],
            lease_rule: true,
            slots: SLOTS,
            up: Vec::new(),
            hellos: Vec::new(),
            result: None,
            attempts: Vec::new(),
        }
    }

    /// Hops of `lanes` lanes, lane k at least `pace[k]` between two frames.
    fn with_lanes(mut self, pace: &[Duration]) -> Self {
        self.lanes = pace.len();
        self.pace = pace.to_vec();
        self
    }

    fn replica(&mut self, name: &str) -> &mut Replica {
        self.replicas.iter_mut().find(|r| r.name == name).expect("a replica of the sim")
    }

    fn at(&mut self, after: Duration, ev: Ev) {
        self.order += 1;
        self.events.insert((self.now + after, self.order), ev);
    }

    /// Runs the push as the primary does: attempts, as the repair decides. Returns the final
    /// outcome of every replica, in chain order.
    fn push(&mut self, repair: bool) -> Result<Vec<ReplicaReport>, NodeError> {
        let to: Vec<String> = self.replicas.iter().map(|r| r.name.clone()).collect();
        let mut plan = Repair::new(to, false, repair, false);
        let mut result = self.attempt(plan.chain(), plan.incremental(), repair);
        let mut reported = false;
        loop {
            reported |= result.is_ok();
            let step = match &result {
                Ok(reports) => plan.next(Attempted::Reported(reports)),
                Err((node, error, at_start)) => plan.next(Attempted::Failed(Failed {
                    node: Some((node.as_str(), error)),
                    error,
                    at_start: *at_start,
                    held: false,
                })),
            };
            if step == Step::Stop {
                break;
            }
            result = self.attempt(plan.chain(), plan.incremental(), repair);
        }
        let end = plan.finish(result.as_ref().ok().map(Vec::as_slice));
        match result {
            // Nothing decided: the last attempt's failure is the push's.
            Err((_, e, _)) if !reported && !end.nothing_sent => Err(e),
            _ => Ok(end.replicas),
        }
    }

    /// Forms the chain (HELLO down, admission at every replica), then streams until the
    /// primary's machine finishes.
    fn attempt(&mut self, chain: &[String], routed: bool, repair: bool) -> AttemptResult {
        let idx: Vec<usize> =
            chain.iter().map(|n| self.replicas.iter().position(|r| &r.name == n).expect("known")).collect();
        self.attempts.push((chain.to_vec(), routed));
        for r in &mut self.replicas {
            r.arrived.clear();
            r.before.push(r.journal.clone());
        }
        // The HELLO travels down; the first node that cannot take it answers for the push.
        let flags = HelloFlags::default().with(HelloFlags::REPAIR, repair);
        for (pos, &i) in idx.iter().enumerate() {
            let r = &self.replicas[i];
            if !r.alive {
                let e = NodeError::new(ErrorKind::Unreachable, format!("connection to {} refused", r.name));
                return Err((r.name.clone(), e, true));
            }
            let hello = Hello {
                name: "ckpt".into(),
                version: 1,
                mode: Mode::Sync,
                transport: Transport::Tcp,
                keep: 0,
                flags,
                you: r.name.clone(),
                downstream: chain[pos + 1..].to_vec(),
                manifest: self.manifest.clone(),
                wants: if routed { vec![None; chain.len() - pos] } else { Vec::new() },
                grant: Grant::default(),
                lanes: self.lanes as u8,
            };
            let policy = Policy {
                max_chain: r.max_chain,
                max_entries: 1000,
                pool_bytes: 64 << 20,
                require_encrypt: r.require_encrypt,
                own_key: None,
                acl: &[],
                max_version_ahead: 0,
            };
            let verdict = admission::check_hello(&hello, &policy)
                .and_then(|()| admission::admit(&hello, &policy, &Peer::default()).map(|_| ()));
            self.hellos.push((i, hello));
            if let Err(e) = verdict {
                return Err((r.name.clone(), e, true));
            }
        }
        // A routed push: each replica says what it holds; each node's route follows.
        let haves: Vec<Vec<(u64, u64)>> =
            idx.iter().map(|&i| self.replicas[i].journal.iter().map(|&q| (q, 1)).collect()).collect();
        let needs = if routed { route::needs(&self.manifest, &vec![None; chain.len()], &haves) } else { Vec::new() };
        self.nodes.clear();
        for pos in 0..=chain.len() {
            let (role, name) = if pos == 0 { (Role::Primary, "") } else { (Role::Replica, chain[pos - 1].as_str()) };
            let route = Route::for_position(&needs, pos);
            let first = route.next_passing(0, self.total);
            let expected = (0..self.total).filter(|&q| route.passes(q)).count() as u64;
            let mut machine = NodeMachine::new(role, name, chain[pos..].to_vec(), self.total).with_route(route.clone());
            if repair && pos > 0 {
                machine.set_stop_on_loss();
            }
            self.nodes.push(Node {
                replica: (pos > 0).then(|| idx[pos - 1]),
                machine,
                route,
                free: (0..self.slots).rev().map(SlotId).collect(),
                held: BTreeSet::new(),
                queue: VecDeque::new(),
                lane_queues: vec![VecDeque::new(); self.lanes],
                lane_of: BTreeMap::new(),
                lane_next: vec![first; self.lanes],
                lane_chunks: vec![0; self.lanes],
                arrived: 0,
                expected,
                end: EndSeen::No,
                stall: HopStall::new(self.base + self.now),
                acks: Vec::new(),
                done: false,
                next_read: 0,
            });
        }
        self.down = vec![vec![VecDeque::new(); self.lanes]; chain.len()];
        self.up = vec![VecDeque::new(); chain.len()];
        self.events.clear();
        for n in 0..self.nodes.len() {
            let mut out = Vec::new();
            self.nodes[n].machine.start(&mut out);
            self.act(n, out);
        }
        self.read(0);
        self.at(TICK, Ev::Tick);
        self.run()
    }

    /// Steps the clock from event to event until the primary's machine is done.
    fn run(&mut self) -> AttemptResult {
        loop {
            if let Some(result) = self.result.take() {
                return result;
            }
            let Some(((t, _), ev)) = self.events.pop_first() else { panic!("no event left at {:?}", self.now) };
            assert!(t < Duration::from_secs(3600), "the chain is stuck: an hour of virtual time without an end");
            self.now = t;
            match ev {
                Ev::Local(n, e) => self.feed(n, e),
                Ev::Arrive { link, down: true } => self.receive_down(link + 1),
                Ev::Arrive { link, down: false } => self.receive_up(link),
                Ev::Lost(n, error) => self.lost(n, error),
                Ev::Tick => {
                    self.tick();
                    self.at(TICK, Ev::Tick);
                }
            }
        }
    }

    /// Feeds one event to node `n`'s machine and carries out its actions.
    fn feed(&mut self, n: usize, e: Event) {
        if self.nodes[n].done || self.is_dead(n) {
            return;
        }
        if let (Event::WriteDone { seq }, Some(i)) = (&e, self.nodes[n].replica) {
            self.replicas[i].journal.insert(*seq);
        }
        let mut out = Vec::new();
        self.nodes[n].machine.handle(e, &mut out);
        self.act(n, out);
    }

    fn is_dead(&self, n: usize) -> bool {
        self.nodes[n].replica.is_some_and(|i| !self.replicas[i].alive || self.replicas[i].hung)
    }

    fn act(&mut self, n: usize, actions: Vec<Action>) {
        for a in actions {
            match a {
                Action::Forward { seq, .. } => {
                    let lane = self.nodes[n].lane_of.remove(&seq);
                    self.send_down(n, lane, Frame::Chunk(seq));
                }
                Action::SendEnd => self.send_down(n, (n > 0).then_some(0), Frame::End),
                Action::Write { seq, .. } => {
                    let d = self.rng.delay();
                    self.at(d, Ev::Local(n, Event::WriteDone { seq }));
                }
                Action::Release { slot } => {
                    let node = &mut self.nodes[n];
                    assert!(node.held.remove(&slot), "node {n} released {slot:?}, which it does not hold");
                    node.free.push(slot);
                    if n == 0 {
                        self.read(0);
                    } else {
                        self.receive_down(n);
                    }
                }
                Action::AckUpstream { through } => {
                    self.check_ack(n, through);
                    self.nodes[n].acks.push(through);
                    if n > 0 {
                        self.send_up(n, Frame::Ack(through));
                    }
                }
                Action::Sync => {
                    let d = self.rng.delay();
                    self.at(d, Ev::Local(n, Event::SyncDone { result: Ok(()) }));
                }
                Action::Publish => {
                    let i = self.nodes[n].replica.expect("replicas publish");
                    self.replicas[i].published = true;
                    let d = self.rng.delay();
                    self.at(d, Ev::Local(n, Event::PublishDone { result: Ok(()) }));
                }
                Action::Finish { reports } | Action::ReportEarly { reports } => self.end(n, Ok(reports)),
                Action::Abort { error } => {
                    let mut reports = vec![ReplicaReport::failed(self.nodes[n].machine.node(), error.clone())];
                    for d in self.nodes[n].machine.downstream_nodes() {
                        reports.push(ReplicaReport::failed(d, NodeError::new(ErrorKind::Aborted, "aborted upstream")));
                    }
                    self.end(n, Err((error, reports)));
                }
                Action::Stop { error, downstream } => {
                    let mut reports = vec![ReplicaReport::failed(self.nodes[n].machine.node(), error.clone())];
                    reports.extend(downstream);
                    self.end(n, Err((error, reports)));
                }
            }
        }
    }

    /// The session of node `n` is over: a replica sends its reports upstream; one that gave up
    /// closes its downstream connection, which ends the sessions after it.
    fn end(&mut self, n: usize, r: Result<Vec<ReplicaReport>, (NodeError, Vec<ReplicaReport>)>) {
        self.nodes[n].done = true;
        if n == 0 {
            let first = self.nodes[0].machine.downstream_nodes()[0].clone();
            self.result = Some(r.map_err(|(e, _)| (first, e, false)));
            return;
        }
        let gave_up = r.is_err();
        let reports = r.unwrap_or_else(|(_, reports)| reports);
        self.send_up(n, Frame::Result(reports));
        if gave_up {
            self.upstream_lost(n + 1);
        }
    }

    /// Node `m`'s upstream went away: its session ends (its journal stays), and so do the
    /// sessions after it.
    fn upstream_lost(&mut self, m: usize) {
        if m < self.nodes.len() && !self.nodes[m].done {
            self.nodes[m].done = true;
            self.upstream_lost(m + 1);
        }
    }

    /// The replica at node `n` dies.
    fn kill(&mut self, n: usize) {
        let i = self.nodes[n].replica.expect("replicas die");
        self.replicas[i].alive = false;
        self.nodes[n].done = true;
        let e = NodeError::new(ErrorKind::ConnectionLost, format!("connection to {} lost", self.replicas[i].name));
        self.at(LATENCY, Ev::Lost(n - 1, e));
        self.upstream_lost(n + 1);
    }

    /// Node `n` stops sending downstream: nothing is in flight any more when the machine hears.
    fn lost(&mut self, n: usize, error: NodeError) {
        if self.nodes[n].done || self.is_dead(n) {
            return;
        }
        self.clear_down(n);
        self.up[n].clear();
        self.upstream_lost(n + 1);
        self.feed(n, Event::DownstreamLost { error });
    }

    /// Queues `frame` for node `n`'s hop downstream: on lane `lane` (a relay's chunk: the lane
    /// it came on; END: lane 0), or for whichever lane has room first (the primary's).
    fn send_down(&mut self, n: usize, lane: Option<usize>, frame: Frame) {
        match lane {
            Some(k) if self.lanes > 1 => self.nodes[n].lane_queues[k].push_back(frame),
            _ => self.nodes[n].queue.push_back(frame),
        }
        self.pump(n);
    }

    /// Nothing more goes downstream from node `n`, and nothing is in flight.
    fn clear_down(&mut self, n: usize) {
        self.nodes[n].queue.clear();
        self.nodes[n].lane_queues.iter_mut().for_each(VecDeque::clear);
        self.down[n].iter_mut().for_each(VecDeque::clear);
    }

    /// Moves node `n`'s queued sends onto its lanes while they have room. A send completes
    /// when the link takes it.
    fn pump(&mut self, n: usize) {
        for k in 0..self.lanes {
            while self.down[n][k].len() < WINDOW {
                let node = &mut self.nodes[n];
                let frame = match node.lane_queues[k].pop_front() {
                    Some(f) => f,
                    None if k > 0 && node.queue.front() == Some(&Frame::End) => break,
                    None => match node.queue.pop_front() {
                        Some(f) => f,
                        None => break,
                    },
                };
                let lane = &self.down[n][k];
                let after = lane.back().map_or(Duration::ZERO, |f| f.0 + self.pace[k]);
                let jitter = if self.lanes > 1 { self.rng.delay() / 4 } else { Duration::ZERO };
                let arrival = (self.now + LATENCY + jitter).max(after);
                if let Frame::Chunk(seq) = frame {
                    self.nodes[n].lane_chunks[k] += 1;
                    self.at(Duration::ZERO, Ev::Local(n, Event::ForwardDone { seq }));
                }
                self.down[n][k].push_back((arrival, frame));
                self.at(arrival - self.now, Ev::Arrive { link: n, down: true });
            }
        }
    }

    fn send_up(&mut self, n: usize, frame: Frame) {
        let link = &mut self.up[n - 1];
        let arrival = (self.now + LATENCY).max(link.back().map_or(Duration::ZERO, |f| f.0));
        link.push_back((arrival, frame));
        self.at(arrival - self.now, Ev::Arrive { link: n - 1, down: false });
    }

    /// Node `n` takes what arrived from upstream on each lane: a frame only into a free slot
    /// its lane may lease (the session receives every frame's header into one).
    fn receive_down(&mut self, n: usize) {
        for k in 0..self.lanes {
            if self.receive_lane(n, k) {
                return;
            }
        }
    }

    /// `receive_down` on lane `k`; true when the node died or hung meanwhile.
    fn receive_lane(&mut self, n: usize, k: usize) -> bool {
        if self.nodes[n].done || self.is_dead(n) {
            return true;
        }
        let i = self.nodes[n].replica.expect("replicas receive");
        while let Some((t, frame)) = self.down[n - 1][k].front() {
            let node = &self.nodes[n];
            let next = node.machine.next_dispatch();
            let lease =
                !self.lease_rule || may_lease(k, self.lanes, node.lane_next[k], next, node.free.len(), node.end);
            // Every frame's header lands in a leased slot; one lane keeps the sim's simpler model
            // of END, taken without one.
            let needs_slot = matches!(frame, Frame::Chunk(_)) || self.lanes > 1;
            if *t > self.now || needs_slot && (node.free.is_empty() || !lease) {
                break;
            }
            let (_, frame) = self.down[n - 1][k].pop_front().expect("front");
            self.nodes[n - 1].stall.progress(self.base + self.now);
            self.pump(n - 1);
            match frame {
                Frame::Chunk(seq) => {
                    let node = &mut self.nodes[n];
                    let slot = node.free.pop().expect("a free slot");
                    node.held.insert(slot);
                    node.lane_next[k] = node.route.next_passing(seq + 1, self.total);
                    node.arrived += 1;
                    if self.lanes > 1 && node.route.onward(seq) {
                        node.lane_of.insert(seq, k);
                    }
                    self.replicas[i].arrived.push(seq);
                    let count = self.replicas[i].arrived.len() as u64;
                    let d = self.rng.delay();
                    if self.replicas[i].fault == Some((count, Fault::Corrupt)) {
                        self.replicas[i].fault = None;
                        self.at(d, Ev::Local(n, Event::ChunkCorrupt { seq, slot }));
                        continue;
                    }
                    self.at(d, Ev::Local(n, Event::ChunkReady { seq, slot, lane_order: false }));
                    let node = &mut self.nodes[n];
                    if node.end == EndSeen::Pending && node.arrived == node.expected {
                        // END came ahead of this chunk, on lane 0.
                        node.end = EndSeen::Received;
                        self.at(d, Ev::Local(n, Event::UpstreamEnd));
                    }
                    match self.replicas[i].fault {
                        Some((after, Fault::Die)) if count >= after => {
                            self.kill(n);
                            return true;
                        }
                        Some((after, Fault::Hang)) if count >= after => {
                            self.replicas[i].hung = true;
                            return true;
                        }
                        Some((after, Fault::CutLane)) if count == after => {
                            // The hop breaks: its upstream hears at once, and this session ends.
                            self.replicas[i].fault = None;
                            let e = NodeError::new(
                                ErrorKind::ConnectionLost,
                                format!("lane {k} to {} cut", self.replicas[i].name),
                            );
                            self.at(Duration::ZERO, Ev::Lost(n - 1, e));
                            return true;
                        }
                        _ => {}
                    }
                }
                Frame::End if self.nodes[n].arrived < self.nodes[n].expected => self.nodes[n].end = EndSeen::Pending,
                Frame::End => {
                    self.nodes[n].end = EndSeen::Received;
                    self.at(Duration::ZERO, Ev::Local(n, Event::UpstreamEnd));
                }
                f => panic!("{f:?} travelling downstream"),
            }
        }
        false
    }

    /// Node `n` takes what its downstream sent back.
    fn receive_up(&mut self, n: usize) {
        while let Some((t, _)) = self.up[n].front() {
            if *t > self.now || self.nodes[n].done || self.is_dead(n) {
                return;
            }
            let (_, frame) = self.up[n].pop_front().expect("front");
            self.nodes[n].stall.progress(self.base + self.now);
            match frame {
                Frame::Ack(through) => self.feed(n, Event::DownstreamAck { through }),
                Frame::Result(reports) => {
                    // Downstream is done: nothing more goes to it, nothing is in flight.
                    self.clear_down(n);
                    self.feed(n, Event::DownstreamResult { reports });
                }
                f => panic!("{f:?} travelling upstream"),
            }
        }
    }

    /// The primary reads chunks into its free slots (those that go onward).
    fn read(&mut self, n: usize) {
        let node = &mut self.nodes[n];
        while !node.done && node.next_read < self.total {
            let seq = node.next_read;
            if !node.route.passes(seq) {
                node.next_read += 1;
                continue;
            }
            let Some(slot) = node.free.pop() else { break };
            node.next_read += 1;
            node.held.insert(slot);
            let d = self.rng.delay();
            self.order += 1;
            self.events
                .insert((self.now + d, self.order), Ev::Local(n, Event::ChunkReady { seq, slot, lane_order: false }));
        }
    }

    /// Every live node that waits on its downstream looks at its deadline.
    fn tick(&mut self) {
        for n in 0..self.nodes.len() - 1 {
            if self.nodes[n].done || !self.nodes[n].machine.downstream_alive() || self.is_dead(n) {
                continue;
            }
            let now = self.base + self.now;
            let node = &mut self.nodes[n];
            let limit = hop_limit(self.hop_timeout, node.machine.downstream_nodes().len());
            let waiting = !node.queue.is_empty() || node.lane_queues.iter().any(|q| !q.is_empty());
            if let Some(stalled) = node.stall.tick(Tick { now, waiting }, limit) {
                let e = stalled.error(&node.machine.downstream_nodes()[0]);
                self.lost(n, e);
            }
        }
    }

    /// An ACK from node `n` through `through` must not cover a chunk that a node from `n` to
    /// the tail (or to the first whose downstream is gone) stores and has not written; and ACKs
    /// only grow.
    fn check_ack(&self, n: usize, through: u64) {
        assert!(self.nodes[n].acks.last().is_none_or(|&a| a < through), "node {n}: ack {through} after a larger one");
        for node in &self.nodes[n..] {
            if let Some(i) = node.replica {
                let r = &self.replicas[i];
                for seq in (0..through).filter(|&q| node.route.here(q)) {
                    assert!(
                        r.journal.contains(&seq),
                        "node {n} acked {through}, but {} has not written chunk {seq}",
                        r.name
                    );
                }
            }
            if !node.machine.downstream_alive() {
                // The nodes after a lost (or finished) downstream no longer count.
                break;
            }
        }
    }

    fn virtual_time(&self) -> Duration {
        self.now
    }
}

fn names(reports: &[ReplicaReport]) -> Vec<(&str, Option<ErrorKind>)> {
    reports
        .iter()
        .map(|r| {
            (
                r.node.as_str(),
                match &r.outcome {
                    Outcome::Failed(e) => Some(e.kind),
                    _ => None,
                },
            )
        })
        .collect()
}

const CHAIN: [&str; 3] = ["r1:1", "r2:2", "r3:3"];

#[test]
fn admission_runs_down_the_chain_and_the_first_refusal_answers_for_the_push() {
    let mut sim = Sim::new(1, &CHAIN, 16);
    sim.replica("r2:2").require_encrypt = true;
    let e = sim.push(true).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Unauthorized, "{e}");
    // r1 admitted a HELLO naming the two after it; r2 refused; r3 never heard of the push.
    let heard: Vec<(usize, Vec<String>)> = sim.hellos.iter().map(|(i, h)| (*i, h.downstream.clone())).collect();
    assert_eq!(heard, vec![(0, vec!["r2:2".to_owned(), "r3:3".to_owned()]), (1, vec!["r3:3".to_owned()])]);
    assert!(sim.replicas.iter().all(|r| r.arrived.is_empty() && !r.published), "no chunk moved");

    // A chain longer than r1 allows is refused by r1 itself, as unsupported.
    let mut sim = Sim::new(1, &CHAIN, 16);
    sim.replica("r1:1").max_chain = 2;
    assert_eq!(sim.push(true).unwrap_err().kind, ErrorKind::Unsupported);
    assert_eq!(sim.hellos.len(), 1);
}

#[test]
fn a_whole_push_reaches_every_replica_with_acks_that_never_run_ahead() {
    for seed in 0..20 {
        let mut sim = Sim::new(seed, &CHAIN, 40);
        let reports = sim.push(false).unwrap();
        assert_eq!(names(&reports), vec![("r1:1", None), ("r2:2", None), ("r3:3", None)], "seed {seed}");
        for r in &sim.replicas {
            assert!(r.published, "seed {seed}: {}", r.name);
            assert_eq!(r.journal.len(), 40, "seed {seed}: {}", r.name);
            assert_eq!(r.arrived, (0..40).collect::<Vec<_>>(), "seed {seed}: {} got chunks out of order", r.name);
        }
        for (n, node) in sim.nodes.iter().enumerate() {
            assert_eq!(node.acks.last(), Some(&40), "seed {seed}: node {n} acked {:?}", node.acks);
            assert_eq!(node.held.len(), 0, "seed {seed}: node {n} kept slots {:?}", node.held);
            assert_eq!(node.free.len(), usize::from(SLOTS), "seed {seed}: node {n}");
        }
    }
}

#[test]
fn a_hung_replica_is_reported_stalled_by_its_upstream_and_the_rest_goes_on() {
    let mut sim = Sim::new(7, &CHAIN, 40);
    sim.replica("r2:2").fault = Some((5, Fault::Hang));
    let reports = sim.push(false).unwrap();
    // r1, nearest the hung node, gives up on it (after 2 x 10 s: two nodes from r2 to the
    // tail); the primary, which only saw backpressure, does not give up on r1.
    assert_eq!(
        names(&reports),
        vec![("r1:1", None), ("r2:2", Some(ErrorKind::Stalled)), ("r3:3", Some(ErrorKind::Aborted))]
    );
    let Outcome::Failed(e) = &reports[1].outcome else { unreachable!() };
    assert_eq!(e.message, "r2:2 made no progress for 20 s (hung, or its link is down)");
    assert!(sim.virtual_time() >= Duration::from_secs(20), "{:?}", sim.virtual_time());
    assert!(sim.virtual_time() < Duration::from_secs(30), "{:?}", sim.virtual_time());
    assert_eq!(sim.replicas[0].journal.len(), 40);
}

#[test]
fn a_replica_that_dies_mid_push_is_repaired_around_and_the_others_resume() {
    let mut sim = Sim::new(3, &CHAIN, 40);
    sim.replica("r2:2").fault = Some((12, Fault::Die));
    let reports = sim.push(true).unwrap();
    assert_eq!(names(&reports), vec![("r1:1", None), ("r2:2", Some(ErrorKind::ConnectionLost)), ("r3:3", None)]);
    assert!(sim.replicas[0].published && sim.replicas[2].published && !sim.replicas[1].published);
    assert_eq!(sim.replicas[0].journal.len(), 40);
    assert_eq!(sim.replicas[2].journal.len(), 40);
    // The attempts: the push; the repair over the three (r2 cannot be reached: left out at
    // once); the repair over r1 and r3, routed.
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    assert_eq!(sim.attempts, vec![(s(&CHAIN), false), (s(&CHAIN), true), (s(&["r1:1", "r3:3"]), true)]);
    // r3 resumes: in the last attempt it got only the chunks it had not journaled before.
    let before = &sim.replicas[2].before[2];
    assert!(!before.is_empty(), "r3 had journaled chunks before r2 died");
    assert!(sim.replicas[2].arrived.iter().all(|q| !before.contains(q)), "a journaled chunk travelled again");
    assert_eq!(before.len() + sim.replicas[2].arrived.len(), 40);

    // Without repair, r1 takes the rest alone and r3 is left cut off.
    let mut sim = Sim::new(3, &CHAIN, 40);
    sim.replica("r2:2").fault = Some((12, Fault::Die));
    let reports = sim.push(false).unwrap();
    assert_eq!(
        names(&reports),
        vec![("r1:1", None), ("r2:2", Some(ErrorKind::ConnectionLost)), ("r3:3", Some(ErrorKind::Aborted))]
    );
    assert!(!sim.replicas[2].published);
}

#[test]
fn a_corrupt_chunk_fails_one_replica_and_the_repair_refetches_from_where_it_stopped() {
    let mut sim = Sim::new(11, &CHAIN, 40);
    sim.replica("r2:2").fault = Some((20, Fault::Corrupt));
    let reports = sim.push(true).unwrap();
    assert_eq!(names(&reports), vec![("r1:1", None), ("r2:2", None), ("r3:3", None)]);
    assert!(sim.replicas.iter().all(|r| r.published && r.journal.len() == 40));
    // r1 is not stopped by a corrupt chunk after it (the primary refetches it on its own):
    // it finishes; r2 (which refused chunk 19) and r3 (cut off behind it) get one routed push.
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    assert_eq!(sim.attempts, vec![(s(&CHAIN), false), (s(&["r2:2", "r3:3"]), true)]);
    let (r2, r3) = (&sim.replicas[1], &sim.replicas[2]);
    assert!(!r2.before[1].contains(&19), "the corrupt chunk was not journaled");
    assert!(r2.arrived.contains(&19));
    // A chunk travels to r2 only when r2 or r3 (after it) lacks it; none to r3 that it has.
    assert!(r2.arrived.iter().all(|q| !r2.before[1].contains(q) || !r3.before[1].contains(q)));
    assert!(r3.arrived.iter().all(|q| !r3.before[1].contains(q)), "a journaled chunk travelled again");
    assert!(r2.arrived.len() < 40, "r2 resumed");
}

const US: Duration = Duration::from_micros(1);

#[test]
fn lanes_reorder_chunks_yet_every_replica_writes_each_once_and_acks_never_run_ahead() {
    let mut reordered = 0;
    for (seed, pace) in (0..30).zip(
        [
            [Duration::ZERO, Duration::ZERO].as_slice(),
            &[Duration::ZERO, Duration::ZERO, Duration::ZERO],
            &[US * 100, US * 600],
        ]
        .iter()
        .cycle(),
    ) {
        let lanes = pace.len();
        let mut sim = Sim::new(seed, &CHAIN, 40).with_lanes(pace);
        let reports = sim.push(false).unwrap_or_else(|e| panic!("seed {seed}, {lanes} lanes: {e}"));
        assert_eq!(names(&reports), vec![("r1:1", None), ("r2:2", None), ("r3:3", None)], "seed {seed}");
        for r in &sim.replicas {
            assert!(r.published, "seed {seed}: {}", r.name);
            assert_eq!(r.journal.len(), 40, "seed {seed}: {}", r.name);
            let mut got = r.arrived.clone();
            reordered += usize::from(got.windows(2).any(|w| w[0] > w[1]));
            got.sort_unstable();
            assert_eq!(got, (0..40).collect::<Vec<_>>(), "seed {seed}: {} got a chunk twice or never", r.name);
        }
        for (n, node) in sim.nodes.iter().enumerate() {
            assert_eq!(node.acks.last(), Some(&40), "seed {seed}: node {n} acked {:?}", node.acks);
            assert!(node.held.is_empty() && node.free.len() == usize::from(sim.slots), "seed {seed}: node {n}");
            if n + 1 < sim.nodes.len() {
                assert!(node.lane_chunks.iter().all(|&c| c > 0), "seed {seed}: node {n} lanes {:?}", node.lane_chunks);
                assert_eq!(node.lane_chunks.iter().sum::<u64>(), 40, "seed {seed}: node {n}");
            }
        }
        // A relay forwards on lane k what came on lane k: every hop's lanes carry alike.
        assert_eq!(sim.nodes[1].lane_chunks, sim.nodes[0].lane_chunks, "seed {seed}");
        assert_eq!(sim.nodes[2].lane_chunks, sim.nodes[0].lane_chunks, "seed {seed}");
    }
    assert!(reordered > 0, "no replica ever saw chunks out of order: the lanes tested nothing");
}

#[test]
fn a_slower_lane_carries_fewer_chunks() {
    // Enough slots that the receivers can hold what the fast lane brings while a chunk of the
    // slow one is on its way (with too few, the slow lane paces the whole hop).
    let mut sim = Sim::new(5, &CHAIN, 60).with_lanes(&[US * 50, US * 1000]);
    sim.slots = 16;
    sim.push(false).unwrap();
    let l = &sim.nodes[0].lane_chunks;
    assert!(l[1] > 0 && l[1] * 3 < l[0], "a lane 20 x slower took {l:?}");
}

#[test]
fn without_the_lease_rule_lanes_running_ahead_take_every_slot_and_the_chain_stalls() {
    // Lane 1 is slow: lane 0 runs ahead of the chunk it carries.
    let pace = [US * 10, US * 2000];
    let mut stalled = 0;
    for seed in 0..10 {
        let mut sim = Sim::new(seed, &CHAIN, 40).with_lanes(&pace);
        sim.lease_rule = false;
        let reports = sim.push(false).unwrap();
        stalled += usize::from(names(&reports).iter().any(|(_, e)| *e == Some(ErrorKind::Stalled)));
        let mut sim = Sim::new(seed, &CHAIN, 40).with_lanes(&pace);
        let reports = sim.push(false).unwrap();
        assert_eq!(names(&reports), vec![("r1:1", None), ("r2:2", None), ("r3:3", None)], "seed {seed}");
    }
    assert!(stalled > 0, "lanes ran ahead without the rule, and nothing stalled: the test shows nothing");
}

#[test]
fn a_lane_cut_mid_push_fails_its_hop_and_the_repair_resumes_every_replica() {
    for seed in 0..10 {
        let mut sim = Sim::new(seed, &CHAIN, 40).with_lanes(&[Duration::ZERO, Duration::ZERO]);
        sim.replica("r2:2").fault = Some((15, Fault::CutLane));
        let reports = sim.push(true).unwrap();
        assert_eq!(names(&reports), vec![("r1:1", None), ("r2:2", None), ("r3:3", None)], "seed {seed}");
        assert!(sim.replicas.iter().all(|r| r.published && r.journal.len() == 40), "seed {seed}");
        assert!(sim.attempts.len() > 1, "seed {seed}: the cut lane was never noticed");
        // r2 resumes: a chunk travels to it again only when r2 or r3 (after it) lacks it.
        let (r2, r3) = (&sim.replicas[1], &sim.replicas[2]);
        let (b2, b3) = (r2.before.last().unwrap(), r3.before.last().unwrap());
        assert!(b2.len() >= 10, "seed {seed}: r2 had journaled {} chunks", b2.len());
        assert!(r2.arrived.iter().all(|q| !b2.contains(q) || !b3.contains(q)), "seed {seed}: a chunk travelled again");
        assert!(r2.arrived.len() < 40, "seed {seed}: r2 did not resume");
    }
}
