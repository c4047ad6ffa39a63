//! The last warnings and errors the relay logged, kept in memory for the admin page.
//!
//! A `tracing` layer beside the log's own output: every WARN or ERROR event is also kept here,
//! with its fields, the 50 most recent of them.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::Mutex;

use serde::Serialize;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::Context;

/// How many are kept.
pub const KEPT: usize = 50;

/// One warning or error.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Warning {
    pub unix_ms: u64,
    /// `WARN` or `ERROR`.
    pub level: &'static str,
    /// The message, then its fields as `name=value`.
    pub text: String,
}

struct Kept {
    recent: VecDeque<Warning>,
    total: u64,
}

static KEPT_WARNINGS: Mutex<Kept> = Mutex::new(Kept {
    recent: VecDeque::new(),
    total: 0,
});

fn kept() -> std::sync::MutexGuard<'static, Kept> {
    KEPT_WARNINGS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The warnings and errors logged since start, and the most recent of them, newest first.
pub fn recent(max: usize) -> (u64, Vec<Warning>) {
    let k = kept();
    (k.total, k.recent.iter().rev().take(max).cloned().collect())
}

/// The layer that keeps them; add it to the subscriber beside the log's output.
pub struct Layer;

impl<S: Subscriber> tracing_subscriber::Layer<S> for Layer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let level = *event.metadata().level();
        if level > Level::WARN {
            return;
        }
        let mut text = Text::default();
        event.record(&mut text);
        let mut line = text.message;
        if !text.fields.is_empty() {
            if !line.is_empty() {
                line.push_str(" — ");
            }
            line.push_str(&text.fields);
        }
        let warning = Warning {
            unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            level: if level == Level::ERROR {
                "ERROR"
            } else {
                "WARN"
            },
            text: line,
        };
        let mut k = kept();
        k.total += 1;
        if k.recent.len() == KEPT {
            k.recent.pop_front();
        }
        k.recent.push_back(warning);
    }
}

/// An event's message and its other fields.
#[derive(Default)]
struct Text {
    message: String,
    fields: String,
}

impl Visit for Text {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            self.field(field, format_args!("{value}"));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            self.field(field, format_args!("{value:?}"));
        }
    }
}

impl Text {
    fn field(&mut self, field: &Field, value: std::fmt::Arguments<'_>) {
        if !self.fields.is_empty() {
            self.fields.push(' ');
        }
        let _ = write!(self.fields, "{}={}", field.name(), value);
    }
}

#[cfg(test)]
mod tests {
    use tracing_subscriber::layer::SubscriberExt;

    #[test]
    fn warnings_and_errors_are_kept_with_their_fields_and_nothing_below() {
        let subscriber = tracing_subscriber::registry().with(super::Layer);
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!("not kept");
            tracing::warn!(port = "ttyUSB0", error = %"gone", "serial port lost");
            tracing::error!("disk full");
        });
        let (total, recent) = super::recent(2);
        assert!(total >= 2);
        assert_eq!(recent[0].level, "ERROR");
        assert_eq!(recent[0].text, "disk full");
        assert_eq!(recent[1].level, "WARN");
        assert_eq!(recent[1].text, "serial port lost — port=ttyUSB0 error=gone");
    }
}
