//! JetStream fast-ingest batches: how the uplink publishes to hubs that allow them
//! (nats-server 2.14 and later, `allow_batched` on the stream).
//!
//! A batch is a run of publishes whose reply subject names the batch and each message's place
//! in it: `<inbox>.<batch id>.<flow>.fail.<n>.<op>.$FI`. The hub answers on that subject:
//! - the first message with a flow acknowledgement (`{"type":"ack","seq":0,"msgs":F}`);
//! - then one flow acknowledgement every `F` messages stored, saying that every message of the
//!   batch up to `seq` is stored (in order: "fail" means a gap ends the batch);
//! - the end of the batch (an end-of-batch marker, not stored) with one PubAck carrying the
//!   batch's id and count;
//! - an error for a message (`{"type":"err",…}`, or a PubAck-shaped error for the first): the
//!   batch then ends before it.
//!
//! So a record leaves the outbox when a flow acknowledgement or the batch's PubAck covers it:
//! stored on the hub as a per-message PubAck would have said, with one answer per `F` messages
//! instead of one each. `Nats-Msg-Id` is honoured inside batches too, so a resend after a
//! failure is dropped by the hub as before (silently: the duplicate counter counts only what
//! per-message publishes are told).
//!
//! The first message of a pump run goes alone, and its answer says which path the hub takes:
//! a flow acknowledgement (batches), a plain PubAck (a hub that does not know batches: the
//! message is stored, and the uplink publishes one message at a time from then on), or error
//! 10205 (a stream without `allow_batched`: nothing stored, and the same).
//!
//! [`Batch`] and [`Answer`] hold the protocol state without I/O; [`pump`] drives them.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_nats::jetstream::ErrorCode;
use async_nats::HeaderMap;
use futures::StreamExt;
use serde::Deserialize;
use tokio::time::Instant;

use super::{
    prepare, Cursors, UplinkError, UplinkSettings, UplinkStatus, BACKLOG_SHARE, DELETE_BATCH,
    DELETE_EVERY, REFILL_AT,
};
use crate::store::Store;

/// The hub's error code for a stream that does not allow batched publishes.
pub const BATCH_PUBLISH_DISABLED: ErrorCode = ErrorCode(10205);
/// ... and for a stream or server with as many batches in flight as it takes.
pub const BATCH_PUBLISH_TOO_MANY_INFLIGHT: ErrorCode = ErrorCode(10211);
/// A batch is ended after this many messages, so that the hub's state for it stays small.
const MAX_BATCH: u64 = 50_000;
/// A batch is ended when no record came for this long, so that its last messages are
/// acknowledged (flow acknowledgements only come every `F` messages).
const COMMIT_IDLE: Duration = Duration::from_millis(20);
/// ... or when its oldest unacknowledged message is this old.
const COMMIT_AGE: Duration = Duration::from_millis(250);
/// The most messages per flow acknowledgement the relay asks for (the hub's own limit is 500).
const MAX_FLOW: usize = 500;

/// The messages per flow acknowledgement for `[uplink] window`: one window's worth (at most
/// 500, the hub's own limit).
pub fn flow_for(window: usize) -> u64 {
    window.clamp(1, MAX_FLOW) as u64
}

/// The messages a batch may have unconfirmed for `[uplink] window`: four flow
/// acknowledgements' worth, so that answers keep coming while it is full (the MQTT → hub
/// benchmark's figures for other choices are in docs/BENCHMARKS.md).
pub fn in_flight_for(window: usize) -> usize {
    usize::try_from(flow_for(window)).unwrap_or(MAX_FLOW) * 4
}

/// What the hub answered on a batch's reply subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Every message of the batch up to this sequence is stored (0: none yet, the batch is on).
    Stored(u64),
    /// The batch ended and its first `count` messages are stored.
    Committed { batch: String, count: u64 },
    /// A plain PubAck: the hub does not know batches, and stored the message.
    Plain { duplicate: bool },
    /// The hub refused a message: its JetStream error code (0 when it gave none) and text.
    Refused { code: u64, text: String },
    /// The hub lost messages of the batch between these sequences.
    Gap { expected: u64, got: u64 },
    /// Nobody took the message (no stream captures the subject, or it has no leader).
    NoResponders,
    /// Anything else, as text.
    Unknown(String),
}

#[derive(Deserialize)]
struct Wire {
    #[serde(rename = "type")]
    kind: Option<String>,
    seq: Option<u64>,
    last_seq: Option<u64>,
    stream: Option<String>,
    batch: Option<String>,
    count: Option<u64>,
    #[serde(default)]
    duplicate: bool,
    error: Option<WireError>,
}

#[derive(Deserialize)]
struct WireError {
    #[serde(default)]
    err_code: u64,
    #[serde(default)]
    description: String,
}

impl Answer {
    /// Reads an answer: its payload, and the status of a message with no payload.
    pub fn parse(payload: &[u8], status: Option<u16>) -> Answer {
        if payload.is_empty() {
            return match status {
                Some(503) => Answer::NoResponders,
                other => Answer::Unknown(format!("an empty answer (status {other:?})")),
            };
        }
        let Ok(wire) = serde_json::from_slice::<Wire>(payload) else {
            return Answer::Unknown(String::from_utf8_lossy(payload).into_owned());
        };
        if let Some(error) = wire.error {
            return Answer::Refused {
                code: error.err_code,
                text: error.description,
            };
        }
        match (wire.kind.as_deref(), wire.seq) {
            (Some("ack"), Some(seq)) => Answer::Stored(seq),
            (Some("gap"), Some(got)) => Answer::Gap {
                expected: wire.last_seq.unwrap_or(0),
                got,
            },
            (None, _) if wire.stream.is_some() => match (wire.batch, wire.count) {
                (Some(batch), Some(count)) => Answer::Committed { batch, count },
                _ => Answer::Plain {
                    duplicate: wire.duplicate,
                },
            },
            _ => Answer::Unknown(String::from_utf8_lossy(payload).into_owned()),
        }
    }
}

/// One message of a batch that the hub has not confirmed yet.
#[derive(Debug, Clone, Copy)]
struct Pending {
    /// Its place in the batch (from 1).
    n: u64,
    /// Its outbox sequence.
    seq: u64,
    backlog: bool,
    sent: Instant,
}

/// A batch being sent: its id, what is in flight, and whether it is ending.
#[derive(Debug)]
pub struct Batch {
    id: String,
    flow: u64,
    /// The last place handed out.
    last: u64,
    pending: VecDeque<Pending>,
    /// How many of them are backlog records.
    backlog: usize,
    /// The subject of the last message (the end-of-batch marker goes there).
    subject: String,
    /// When the end-of-batch marker was sent: nothing more joins this batch.
    ended: Option<Instant>,
}

/// What an answer means for the batch.
#[derive(Debug, PartialEq, Eq)]
pub enum Progress {
    /// These outbox records (sequence, sent at) are stored on the hub.
    Stored(Vec<(u64, Instant)>),
    /// The batch is over and everything in it is stored (the records listed).
    Done(Vec<(u64, Instant)>),
}

impl Batch {
    pub fn new(id: String, flow: u64) -> Batch {
        Batch {
            id,
            flow,
            last: 0,
            pending: VecDeque::new(),
            backlog: 0,
            subject: String::new(),
            ended: None,
        }
    }

    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }

    pub fn backlog_in_flight(&self) -> usize {
        self.backlog
    }

    pub fn is_ending(&self) -> bool {
        self.ended.is_some()
    }

    /// How many messages the batch holds.
    pub fn len(&self) -> u64 {
        self.last
    }

    /// Since when the batch has waited for the hub: its oldest unconfirmed message, or its
    /// end-of-batch marker when every message is confirmed.
    pub fn oldest(&self) -> Option<Instant> {
        self.pending.front().map(|p| p.sent).or(self.ended)
    }

    fn reply(&self, inbox: &str, n: u64, op: u8) -> String {
        format!("{inbox}.{}.{}.fail.{n}.{op}.$FI", self.id, self.flow)
    }

    /// The reply subject for the next message (outbox record `seq` to `subject`), taking its
    /// place in the batch.
    pub fn next(
        &mut self,
        inbox: &str,
        seq: u64,
        subject: &str,
        backlog: bool,
        now: Instant,
    ) -> String {
        self.last += 1;
        let n = self.last;
        self.backlog += usize::from(backlog);
        self.pending.push_back(Pending {
            n,
            seq,
            backlog,
            sent: now,
        });
        if self.subject != subject {
            subject.clone_into(&mut self.subject);
        }
        self.reply(inbox, n, if n == 1 { 0 } else { 1 })
    }

    /// The end-of-batch marker: its subject and reply subject.
    pub fn end(&mut self, inbox: &str, now: Instant) -> (String, String) {
        self.ended = Some(now);
        (self.subject.clone(), self.reply(inbox, self.last + 1, 3))
    }

    fn confirm(&mut self, upto: u64) -> Vec<(u64, Instant)> {
        let mut out = Vec::new();
        while let Some(p) = self.pending.front() {
            if p.n > upto {
                break;
            }
            out.push((p.seq, p.sent));
            self.backlog -= usize::from(p.backlog);
            self.pending.pop_front();
        }
        out
    }

    /// What a flow acknowledgement or the batch's PubAck means; an error for anything else
    /// (which ends the pump run: what is unconfirmed stays in the outbox and is sent again).
    pub fn on_answer(&mut self, answer: Answer) -> Result<Progress, Answer> {
        match answer {
            Answer::Stored(upto) if upto <= self.last => Ok(Progress::Stored(self.confirm(upto))),
            Answer::Committed { batch, count } if batch == self.id => {
                if count < self.last {
                    // Fewer stored than sent: a message was lost on the way. Everything
                    // unconfirmed stays in the outbox and is sent again.
                    return Err(Answer::Gap {
                        expected: count + 1,
                        got: self.last,
                    });
                }
                Ok(Progress::Done(self.confirm(count)))
            }
            other => Err(other),
        }
    }
}

/// The id of the `n`th batch of a pump run: the run's inbox token (unique per connection, and
/// so across relays sharing a stream) and `n`; at most 64 characters, as the hub requires.
pub fn batch_id(inbox: &str, n: u64) -> String {
    let token = inbox.rsplit('.').next().unwrap_or(inbox);
    let token: String = token.chars().take(40).collect();
    format!("{token}-{n:x}")
}

/// The uplink error for an answer that ends a pump run.
fn trouble(s: &UplinkSettings, answer: Answer) -> UplinkError {
    match answer {
        Answer::Refused { code, text } => super::hub_code_error(s, ErrorCode(code), text),
        Answer::NoResponders => UplinkError::NoStream {
            subject: format!("{}.>", s.subject_prefix),
        },
        Answer::Gap { expected, got } => UplinkError::Publish(format!(
            "the hub lost messages {expected} to {got} of a batch; sending them again"
        )),
        Answer::Committed { batch, .. } => {
            UplinkError::Publish(format!("the hub acknowledged an unknown batch {batch:?}"))
        }
        Answer::Stored(seq) => UplinkError::Publish(format!(
            "the hub acknowledged batch message {seq}, which was not sent"
        )),
        Answer::Plain { .. } => {
            UplinkError::Publish("the hub answered a batch message with a plain PubAck".into())
        }
        Answer::Unknown(text) => UplinkError::Publish(format!("unexpected hub answer: {text}")),
    }
}

/// Publishes in batches, reading the outbox with `cursors`, until an error; returns only with
/// one. [`UplinkError::NotBatched`] says that the hub takes one message at a time. What the
/// hub confirmed may still be in `acked` (the caller deletes it).
pub async fn pump(
    s: &UplinkSettings,
    client: &async_nats::Client,
    store: &Store,
    status: &UplinkStatus,
    acked: &mut Vec<u64>,
    cursors: &mut Cursors,
) -> Result<(), UplinkError> {
    let mut link = status.link.subscribe();
    let inbox = client.new_inbox();
    let mut answers = client
        .subscribe(format!("{inbox}.>"))
        .await
        .map_err(|e| UplinkError::Publish(e.to_string()))?;
    let flow = flow_for(s.window);
    let window = in_flight_for(s.window);
    let backlog_cap = (window / BACKLOG_SHARE).max(1);
    let epoch = store.epoch();
    let mut batches = 0u64;
    let mut batch: Option<Batch> = None;
    // Until the hub's first answer, one message is in flight.
    let mut proven = false;
    let mut fresh = true;
    let mut last_record = Instant::now();
    let mut first_acked = Instant::now();
    loop {
        let in_flight = batch.as_ref().map_or(0, Batch::in_flight);
        let ending = batch.as_ref().is_some_and(Batch::is_ending);
        let open = if proven { window } else { 1 };
        let room = open.saturating_sub(in_flight);
        let mut read_nothing = false;
        if room > 0 && !ending && (fresh || room >= REFILL_AT.min(open) || in_flight == 0) {
            fresh = false;
            let backlog_in_flight = batch.as_ref().map_or(0, Batch::backlog_in_flight);
            let busy = backlog_cap.saturating_sub(backlog_in_flight);
            let quiet = if in_flight == backlog_in_flight {
                room
            } else {
                busy
            };
            let (records, from_backlog) = cursors.next(store, room, quiet, busy).await?;
            read_nothing = records.is_empty();
            let first_backlog = records.len() - from_backlog;
            for (i, (seq, record)) in records.into_iter().enumerate() {
                let Some((subject, mut headers)) = prepare(s, store, status, seq, &record) else {
                    continue;
                };
                headers.insert(
                    async_nats::header::NATS_MESSAGE_ID,
                    format!("{}-{}-{}", s.relay, epoch, seq).as_str(),
                );
                let b = batch.get_or_insert_with(|| {
                    batches += 1;
                    Batch::new(batch_id(&inbox, batches), flow)
                });
                let now = Instant::now();
                let reply = b.next(&inbox, seq, &subject, i >= first_backlog, now);
                client
                    .publish_with_reply_and_headers(subject, reply, headers, record.payload)
                    .await
                    .map_err(|e| UplinkError::Publish(e.to_string()))?;
                status.published.fetch_add(1, Ordering::Relaxed);
                last_record = now;
            }
        }
        // A batch ends when records stop coming, when it has waited long enough for its last
        // confirmations, or when it is long.
        if let Some(b) = batch.as_mut() {
            let idle = read_nothing && last_record.elapsed() >= COMMIT_IDLE;
            let old = b.oldest().is_some_and(|t| t.elapsed() >= COMMIT_AGE);
            if proven && !b.is_ending() && b.len() > 0 && (idle || old || b.len() >= MAX_BATCH) {
                let (subject, reply) = b.end(&inbox, Instant::now());
                client
                    .publish_with_reply_and_headers(
                        subject,
                        reply,
                        HeaderMap::new(),
                        bytes::Bytes::new(),
                    )
                    .await
                    .map_err(|e| UplinkError::Publish(e.to_string()))?;
            }
        }
        if batch.is_none() {
            super::idle(store, cursors, acked, first_acked).await?;
            fresh = true;
            continue;
        }
        let b_ending = batch.as_ref().is_some_and(Batch::is_ending);
        let in_flight = batch.as_ref().map_or(0, Batch::in_flight);
        let oldest = batch.as_ref().and_then(Batch::oldest);
        let deadline = oldest.map_or_else(
            || Instant::now() + super::ACK_TIMEOUT,
            |t| t + super::ACK_TIMEOUT,
        );
        // Records are waited for while there is room; with none coming, the batch is ended
        // after a short pause.
        let can_take = proven && !b_ending && in_flight < window;
        let wait = if can_take {
            COMMIT_IDLE.min(cursors.pause())
        } else {
            super::ACK_TIMEOUT
        };
        tokio::select! {
            answer = answers.next() => {
                let Some(message) = answer else {
                    return Err(UplinkError::Disconnected);
                };
                let answer = Answer::parse(&message.payload, message.status.map(|s| s.as_u16()));
                let Some(b) = batch.as_mut() else { continue };
                if !proven {
                    match &answer {
                        Answer::Stored(_) => {
                            proven = true;
                            status.batched.store(true, Ordering::Relaxed);
                        }
                        Answer::Plain { duplicate } => {
                            // A hub that does not know batches stored the message.
                            if *duplicate {
                                status.duplicates.fetch_add(1, Ordering::Relaxed);
                            }
                            let stored = b.confirm(1);
                            confirmed(status, acked, &mut first_acked, stored);
                            tell_single(
                                status,
                                s,
                                "the hub does not take fast-ingest batches (nats-server before \
                                 2.14); publishing one message at a time",
                            );
                            return Err(UplinkError::NotBatched { rewind: false });
                        }
                        _ => {}
                    }
                }
                match b.on_answer(answer) {
                    Ok(Progress::Stored(stored)) => {
                        confirmed(status, acked, &mut first_acked, stored);
                    }
                    Ok(Progress::Done(stored)) => {
                        confirmed(status, acked, &mut first_acked, stored);
                        batch = None;
                        fresh = true;
                    }
                    Err(answer) => {
                        if let Answer::Refused { code, .. } = &answer {
                            if let Some(why) = single_reason(ErrorCode(*code)) {
                                tell_single(status, s, why);
                                // Nothing of the batch was stored.
                                return Err(UplinkError::NotBatched { rewind: true });
                            }
                        }
                        return Err(trouble(s, answer));
                    }
                }
                if acked.len() >= DELETE_BATCH
                    || (!acked.is_empty() && first_acked.elapsed() >= DELETE_EVERY)
                {
                    store.delete(std::mem::take(acked))?;
                }
            }
            _ = store.wait_for_records(wait), if can_take => fresh = true,
            _ = tokio::time::sleep_until(deadline) => {
                if batch.as_ref().and_then(Batch::oldest).is_some_and(|t| t.elapsed() >= super::ACK_TIMEOUT) {
                    return Err(UplinkError::TimedOut);
                }
            }
            _ = link.wait_for(|l| l.is_none()) => {
                // What is in flight may or may not have reached the hub: it stays in the
                // outbox and is sent again, and the hub drops what it has by message id.
                return Err(UplinkError::Disconnected);
            }
        }
    }
}

/// Why the hub's refusal `code` means "one message at a time" (nothing of the batch stored),
/// if it does.
fn single_reason(code: ErrorCode) -> Option<&'static str> {
    match code {
        BATCH_PUBLISH_DISABLED => Some(
            "the hub stream does not allow batched publishes (allow_batched); publishing one \
             message at a time",
        ),
        BATCH_PUBLISH_TOO_MANY_INFLIGHT => Some(
            "the hub has as many batches in flight as it takes; publishing one message at a \
             time until the next reconnection or error",
        ),
        _ => None,
    }
}

/// Says (once per run of the relay) why the uplink publishes one message at a time.
fn tell_single(status: &UplinkStatus, s: &UplinkSettings, why: &str) {
    status.batched.store(false, Ordering::Relaxed);
    if !status.told_single.swap(true, Ordering::Relaxed) {
        tracing::info!(stream = s.stream, "{why}");
    }
}

/// Counts records the hub confirmed and queues them for deletion.
fn confirmed(
    status: &UplinkStatus,
    acked: &mut Vec<u64>,
    first_acked: &mut Instant,
    stored: Vec<(u64, Instant)>,
) {
    if stored.is_empty() {
        return;
    }
    if acked.is_empty() {
        status.accepted();
        *first_acked = Instant::now();
    }
    status
        .acknowledged
        .fetch_add(stored.len() as u64, Ordering::Relaxed);
    for (seq, sent) in stored {
        status.record_ack_latency(sent.elapsed());
        acked.push(seq);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_read() {
        assert_eq!(
            Answer::parse(br#"{"type":"ack","seq":0,"msgs":64}"#, None),
            Answer::Stored(0)
        );
        assert_eq!(
            Answer::parse(br#"{"type":"ack","seq":128,"msgs":64}"#, None),
            Answer::Stored(128)
        );
        assert_eq!(
            Answer::parse(
                br#"{"stream":"S","seq":4711,"batch":"abc-1","count":300}"#,
                None
            ),
            Answer::Committed {
                batch: "abc-1".into(),
                count: 300
            }
        );
        assert_eq!(
            Answer::parse(br#"{"stream":"S","seq":5}"#, None),
            Answer::Plain { duplicate: false }
        );
        assert_eq!(
            Answer::parse(br#"{"stream":"S","seq":5,"duplicate":true}"#, None),
            Answer::Plain { duplicate: true }
        );
        assert_eq!(
            Answer::parse(
                br#"{"error":{"code":400,"err_code":10205,"description":"batch publish is disabled"},"stream":"S","seq":0}"#,
                None
            ),
            Answer::Refused {
                code: 10205,
                text: "batch publish is disabled".into()
            }
        );
        assert_eq!(
            Answer::parse(
                br#"{"type":"err","seq":7,"error":{"code":400,"err_code":10002,"description":"resource limits exceeded for account"}}"#,
                None
            ),
            Answer::Refused {
                code: 10002,
                text: "resource limits exceeded for account".into()
            }
        );
        assert_eq!(
            Answer::parse(br#"{"type":"gap","last_seq":5,"seq":9}"#, None),
            Answer::Gap {
                expected: 5,
                got: 9
            }
        );
        assert_eq!(Answer::parse(b"", Some(503)), Answer::NoResponders);
        assert!(matches!(Answer::parse(b"\xff{", None), Answer::Unknown(_)));
        assert!(matches!(
            Answer::parse(br#"{"type":"new"}"#, None),
            Answer::Unknown(_)
        ));
    }

    #[test]
    fn a_batch_numbers_its_messages_and_ends_after_the_last() {
        let now = Instant::now();
        let mut b = Batch::new("tok-1".into(), 64);
        assert_eq!(
            b.next("_INBOX.tok", 10, "hub.a", false, now),
            "_INBOX.tok.tok-1.64.fail.1.0.$FI"
        );
        assert_eq!(
            b.next("_INBOX.tok", 11, "hub.b", false, now),
            "_INBOX.tok.tok-1.64.fail.2.1.$FI"
        );
        assert_eq!(
            b.next("_INBOX.tok", 13, "hub.b", true, now),
            "_INBOX.tok.tok-1.64.fail.3.1.$FI"
        );
        assert_eq!(b.backlog_in_flight(), 1);
        assert_eq!(
            b.end("_INBOX.tok", now),
            ("hub.b".into(), "_INBOX.tok.tok-1.64.fail.4.3.$FI".into())
        );
        assert!(b.is_ending());
        // The first flow acknowledgement confirms nothing; the next confirms in order.
        assert_eq!(
            b.on_answer(Answer::Stored(0)),
            Ok(Progress::Stored(Vec::new()))
        );
        assert_eq!(
            b.on_answer(Answer::Stored(2)),
            Ok(Progress::Stored(vec![(10, now), (11, now)]))
        );
        assert_eq!(
            b.on_answer(Answer::Committed {
                batch: "tok-1".into(),
                count: 3
            }),
            Ok(Progress::Done(vec![(13, now)]))
        );
        assert_eq!(b.in_flight(), 0);
    }

    #[test]
    fn a_batch_with_fewer_stored_than_sent_is_a_gap() {
        let now = Instant::now();
        let mut b = Batch::new("x-1".into(), 1);
        for seq in 1..=5 {
            b.next("_INBOX.x", seq, "s", false, now);
        }
        assert_eq!(
            b.on_answer(Answer::Committed {
                batch: "x-1".into(),
                count: 3
            }),
            Err(Answer::Gap {
                expected: 4,
                got: 5
            })
        );
        // Confirmations beyond what was sent, or for another batch, are not believed.
        assert!(b.on_answer(Answer::Stored(9)).is_err());
        assert!(b
            .on_answer(Answer::Committed {
                batch: "other".into(),
                count: 5
            })
            .is_err());
    }

    #[test]
    fn batch_ids_are_short_subject_tokens() {
        let id = batch_id("_INBOX.abcdefghijklmnopqrstuv", 255);
        assert_eq!(id, "abcdefghijklmnopqrstuv-ff");
        let long = format!("_INBOX.{}", "z".repeat(100));
        let id = batch_id(&long, u64::MAX);
        assert!(id.len() <= 64, "{id}");
        assert!(!id.contains('.'));
    }

    #[test]
    fn a_flow_acknowledgement_per_window_and_four_in_flight() {
        assert_eq!(flow_for(256), 256);
        assert_eq!(in_flight_for(256), 1024);
        assert_eq!(flow_for(1), 1);
        assert_eq!(in_flight_for(1), 4);
        assert_eq!(flow_for(100_000), MAX_FLOW as u64);
        assert_eq!(in_flight_for(100_000), 4 * MAX_FLOW);
    }
}
