//! The driver's command and connection events as Prometheus counters:
//! `mongodb_commands_total`, `mongodb_errors_total`,
//! `mongodb_connections_created_total`, `mongodb_connections_closed_total`.

use mongodb::event::EventHandler;
use mongodb::event::cmap::{CmapEvent, ConnectionClosedReason};
use mongodb::event::command::CommandEvent;
use mongodb::options::ClientOptions;

/// Counts every command the driver sends and every connection it opens and
/// closes.
pub(crate) fn install(options: &mut ClientOptions) {
    options.command_event_handler = Some(EventHandler::callback(|event| match event {
        CommandEvent::Started(started) => {
            metrics::counter!("mongodb_commands_total", "command" => started.command_name)
                .increment(1);
        }
        CommandEvent::Failed(failed) => {
            metrics::counter!("mongodb_errors_total", "command" => failed.command_name)
                .increment(1);
        }
        _ => {}
    }));
    options.cmap_event_handler = Some(EventHandler::callback(|event| match event {
        CmapEvent::ConnectionCreated(_) => {
            metrics::counter!("mongodb_connections_created_total").increment(1);
        }
        CmapEvent::ConnectionClosed(closed) => {
            let reason = match closed.reason {
                ConnectionClosedReason::Stale => "stale",
                ConnectionClosedReason::Idle => "idle",
                ConnectionClosedReason::Error => "error",
                ConnectionClosedReason::Dropped => "dropped",
                ConnectionClosedReason::PoolClosed => "pool_closed",
                _ => "other",
            };
            metrics::counter!("mongodb_connections_closed_total", "reason" => reason).increment(1);
        }
        _ => {}
    }));
}
