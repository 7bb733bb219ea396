//! A stand-in for the parts of myko 4.x that `disk_persister.rs` uses, as
//! described in `shared/reference/wire-format.md`: the wire types (`MEvent`,
//! `MEventType`, `EventOptions`), the persister contract (`Persister`,
//! `PersistError`, `PersistHealth`) and a `CellServerCtx` whose store is an
//! in-memory map. myko itself is not packaged for Debian, so it cannot be
//! built offline; these definitions follow its serde attributes exactly,
//! since they decide which log lines the seed accepts.

pub mod wire {
    use serde::{Deserialize, Serialize};

    /// `SET` upserts the item, `DEL` removes it. serde's externally tagged
    /// form: `"SET"` / `"DEL"` (case-sensitive).
    #[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub enum MEventType {
        SET,
        DEL,
    }

    impl MEventType {
        pub fn as_str(self) -> &'static str {
            match self {
                MEventType::SET => "SET",
                MEventType::DEL => "DEL",
            }
        }
    }

    /// Flags that travel with an event. Unset booleans read as false,
    /// an unset `fromPeer` as None; all three are always written.
    #[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
    #[serde(rename_all = "camelCase")]
    pub struct EventOptions {
        #[serde(default)]
        pub prevent_relationship_updates: bool,
        #[serde(default)]
        pub prevent_persist: bool,
        pub from_peer: Option<bool>,
    }

    /// One change to one entity: one line of the log. Field order is the
    /// order serde writes the keys in. No `deny_unknown_fields`: unknown
    /// keys are ignored when read.
    #[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
    #[serde(rename_all = "camelCase")]
    pub struct MEvent {
        pub item: serde_json::Value,
        pub change_type: MEventType,
        pub item_type: String,
        /// RFC 3339; "now" when absent on read.
        #[serde(default = "now_rfc3339")]
        pub created_at: String,
        /// A fresh UUID v4 when absent on read.
        #[serde(default = "fresh_tx")]
        pub tx: String,
        /// Written as `null` when unset.
        pub source_id: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub options: Option<EventOptions>,
    }

    pub fn now_rfc3339() -> String {
        chrono::Utc::now().to_rfc3339()
    }

    pub fn fresh_tx() -> String {
        uuid::Uuid::new_v4().to_string()
    }

    impl MEvent {
        /// `item.id` when it is a string (the seed's dedup identity).
        pub fn item_id(&self) -> Option<&str> {
            self.item.get("id").and_then(|v| v.as_str())
        }
    }
}

pub mod server {
    use std::collections::{BTreeMap, VecDeque};
    use std::fmt;
    use std::io::Write;
    use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use crate::wire::{MEvent, MEventType};

    /// Why one event could not be persisted.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct PersistError {
        pub entity_type: String,
        pub message: String,
    }

    impl fmt::Display for PersistError {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "persist failed for {}: {}", self.entity_type, self.message)
        }
    }

    impl std::error::Error for PersistError {}

    /// myko's persister counters, with myko's semantics (wire-format.md's
    /// table), `record_dropped`'s leak of `queued` included.
    #[derive(Default)]
    pub struct PersistHealth {
        queued: AtomicI64,
        total_persisted: AtomicU64,
        total_errors: AtomicU64,
        consecutive_errors: AtomicU64,
        last_error: Mutex<Option<String>>,
        recent: Mutex<VecDeque<(Instant, u64)>>,
    }

    impl PersistHealth {
        pub fn record_enqueue(&self) {
            self.queued.fetch_add(1, Ordering::SeqCst);
        }

        pub fn record_success(&self) {
            self.record_success_batch(1);
        }

        pub fn record_success_batch(&self, count: u64) {
            self.queued.fetch_sub(count as i64, Ordering::SeqCst);
            self.total_persisted.fetch_add(count, Ordering::SeqCst);
            if self.consecutive_errors.load(Ordering::SeqCst) > 0 {
                self.consecutive_errors.store(0, Ordering::SeqCst);
                *self.last_error.lock().unwrap() = None;
            }
            let now = Instant::now();
            let mut recent = self.recent.lock().unwrap();
            recent.push_back((now, count));
            Self::prune(&mut recent, now);
        }

        pub fn record_error(&self, msg: impl Into<String>) {
            self.queued.fetch_sub(1, Ordering::SeqCst);
            self.record_error_no_dequeue(msg);
        }

        /// Counts an error but leaves `queued` alone: myko's leak (an
        /// event dropped before the write never leaves the queue count).
        pub fn record_dropped(&self, msg: impl Into<String>) {
            self.record_error_no_dequeue(msg);
        }

        /// Like `record_error`, for an event that will be retried.
        pub fn record_error_no_dequeue(&self, msg: impl Into<String>) {
            self.total_errors.fetch_add(1, Ordering::SeqCst);
            self.consecutive_errors.fetch_add(1, Ordering::SeqCst);
            *self.last_error.lock().unwrap() = Some(msg.into());
        }

        /// Persisted events per second over a sliding one-second window.
        pub fn writes_per_second(&self) -> f64 {
            let now = Instant::now();
            let mut recent = self.recent.lock().unwrap();
            Self::prune(&mut recent, now);
            recent.iter().map(|(_, n)| *n).sum::<u64>() as f64
        }

        fn prune(recent: &mut VecDeque<(Instant, u64)>, now: Instant) {
            while let Some((t, _)) = recent.front() {
                if now.duration_since(*t) > Duration::from_secs(1) {
                    recent.pop_front();
                } else {
                    break;
                }
            }
        }

        pub fn queued(&self) -> i64 {
            self.queued.load(Ordering::SeqCst)
        }
        pub fn total_persisted(&self) -> u64 {
            self.total_persisted.load(Ordering::SeqCst)
        }
        pub fn total_errors(&self) -> u64 {
            self.total_errors.load(Ordering::SeqCst)
        }
        pub fn consecutive_errors(&self) -> u64 {
            self.consecutive_errors.load(Ordering::SeqCst)
        }
        pub fn last_error(&self) -> Option<String> {
            self.last_error.lock().unwrap().clone()
        }
        /// Healthy means no error since the last success.
        pub fn is_healthy(&self) -> bool {
            self.consecutive_errors() == 0
        }
    }

    /// What a myko server needs from a store of events.
    pub trait Persister: Send + Sync {
        fn persist(&self, event: MEvent) -> Result<(), PersistError>;
        fn health(&self) -> Arc<PersistHealth>;
        /// Called before the server starts, so that a broken store fails
        /// startup instead of the first write.
        fn startup_healthcheck(&self) -> Result<(), String> {
            Ok(())
        }
    }

    /// The store key: `itemType` and `item.id` (its string, or for an id
    /// that is not a string, which only the seed's tail path lets through,
    /// its JSON text).
    pub type Key = (String, String);

    pub fn key_of(event: &MEvent) -> Key {
        let id = match event.item.get("id") {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(other) => other.to_string(),
            None => "null".to_string(),
        };
        (event.item_type.clone(), id)
    }

    /// The server context the seed applies events to: an in-memory map of
    /// the live items, shared by clones. With `set_echo(true)` every event
    /// applied is also printed to stdout as one JSON line
    /// `{"itemType":..,"id":..,"changeType":..,"item":..}`, flushed.
    #[derive(Clone, Default)]
    pub struct CellServerCtx {
        items: Arc<Mutex<BTreeMap<Key, serde_json::Value>>>,
        echo: Arc<AtomicBool>,
        applied: Arc<AtomicU64>,
    }

    impl CellServerCtx {
        pub fn new() -> Self {
            Self::default()
        }

        pub fn set_echo(&self, on: bool) {
            self.echo.store(on, Ordering::SeqCst);
        }

        /// Apply in order (SET upserts, DEL removes); returns how many SETs
        /// and DELs were applied.
        pub fn apply_event_batch(&self, events: Vec<MEvent>) -> Result<usize, String> {
            let echo = self.echo.load(Ordering::SeqCst);
            let mut items = self.items.lock().map_err(|e| e.to_string())?;
            let stdout = std::io::stdout();
            let mut out = stdout.lock();
            let mut count = 0;
            for event in events {
                let key = key_of(&event);
                if echo {
                    let id = event.item.get("id").cloned().unwrap_or(serde_json::Value::Null);
                    let line = format!(
                        "{{\"itemType\":{},\"id\":{},\"changeType\":\"{}\",\"item\":{}}}\n",
                        serde_json::Value::String(event.item_type.clone()),
                        id,
                        event.change_type.as_str(),
                        event.item,
                    );
                    out.write_all(line.as_bytes()).map_err(|e| e.to_string())?;
                }
                match event.change_type {
                    MEventType::SET => {
                        items.insert(key, event.item);
                    }
                    MEventType::DEL => {
                        items.remove(&key);
                    }
                }
                count += 1;
            }
            if echo {
                out.flush().map_err(|e| e.to_string())?;
            }
            self.applied.fetch_add(count as u64, Ordering::SeqCst);
            Ok(count)
        }

        /// The live items, sorted by (itemType, id).
        pub fn snapshot(&self) -> Vec<(Key, serde_json::Value)> {
            let items = self.items.lock().unwrap();
            items.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
        }

        /// How many events were applied so far.
        pub fn applied(&self) -> u64 {
            self.applied.load(Ordering::SeqCst)
        }
    }
}
