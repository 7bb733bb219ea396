//! `marshal-seed`: the Rust seed persister (shared/reference/disk_persister.rs,
//! copied and patched by build.rs) behind a command line, so that the Python
//! tests can check both implementations read and write the same log.
//!
//! ```text
//! marshal-seed replay LOG         the seed's replay; prints the live state, one
//!                                 {"itemType":..,"id":..,"item":..} line per
//!                                 entity, sorted by (itemType, id)
//! marshal-seed persist LOG [--ack]
//!                                 persists each JSON line of stdin through the
//!                                 seed's Persister::persist; with --ack (or
//!                                 MARSHAL_SEED_ACK=1) prints "ok" after each;
//!                                 "persisted N" at the end
//! marshal-seed parse              one verdict per line of stdin, as the seed's
//!                                 replay decides it:
//!                                   blank
//!                                   ok<TAB>"itemType"<TAB>"id"   (JSON strings)
//!                                   err<TAB>id                  (item.id missing,
//!                                                                empty or not a string)
//!                                   err<TAB><serde_json's message>
//!                                   abort<TAB><io error>        (invalid UTF-8: the
//!                                                                seed's replay fails whole)
//! marshal-seed follow LOG         replay, then the seed's watcher: prints each
//!                                 event it applies as {"itemType":..,"id":..,
//!                                 "changeType":..,"item":..} and flushes; says
//!                                 "ready replayed=N" on stderr once watching;
//!                                 runs until killed or stdin closes
//! ```
//! MARSHAL_SEED_LOG=warn|info|debug sends the seed's log messages to stderr.

use std::io::{self, BufRead, Read, Write};
use std::process::ExitCode;
use std::sync::Arc;

use myko::server::{CellServerCtx, Persister};
use myko::wire::MEvent;

include!(concat!(env!("OUT_DIR"), "/seed_module.rs"));

use disk_persister::DiskPersister;

const USAGE: &str = "usage: marshal-seed replay LOG | persist LOG [--ack] | parse | follow LOG";

struct StderrLogger;

impl log::Log for StderrLogger {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }
    fn log(&self, record: &log::Record) {
        if self.enabled(record.metadata()) {
            eprintln!("{} {}", record.level(), record.args());
        }
    }
    fn flush(&self) {}
}

static LOGGER: StderrLogger = StderrLogger;

fn init_log() {
    let level = match std::env::var("MARSHAL_SEED_LOG").as_deref() {
        Ok("error") => log::LevelFilter::Error,
        Ok("warn") => log::LevelFilter::Warn,
        Ok("info") => log::LevelFilter::Info,
        Ok("debug") | Ok("trace") => log::LevelFilter::Debug,
        _ => return,
    };
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(level);
    }
}

fn main() -> ExitCode {
    init_log();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match args.as_slice() {
        ["replay", log] => replay(log),
        ["persist", log] => persist(log, std::env::var("MARSHAL_SEED_ACK").as_deref() == Ok("1")),
        ["persist", log, "--ack"] | ["persist", "--ack", log] => persist(log, true),
        ["parse"] => parse(),
        ["follow", log] => follow(log),
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("marshal-seed: {message}");
            ExitCode::FAILURE
        }
    }
}

fn replay(log: &str) -> Result<(), String> {
    let persister = DiskPersister::new(log).map_err(|e| format!("open {log}: {e}"))?;
    let ctx = CellServerCtx::new();
    persister.replay(&ctx).map_err(|e| format!("replay {log}: {e}"))?;
    let stdout = io::stdout();
    let mut out = io::BufWriter::new(stdout.lock());
    for ((item_type, id), item) in ctx.snapshot() {
        writeln!(
            out,
            "{{\"itemType\":{},\"id\":{},\"item\":{}}}",
            serde_json::Value::String(item_type),
            serde_json::Value::String(id),
            item
        )
        .map_err(|e| e.to_string())?;
    }
    out.flush().map_err(|e| e.to_string())
}

fn persist(log: &str, ack: bool) -> Result<(), String> {
    let persister = DiskPersister::new(log).map_err(|e| format!("open {log}: {e}"))?;
    let stdout = io::stdout();
    let mut out = stdout.lock();
    let mut count = 0usize;
    for (lineno, line) in io::stdin().lock().lines().enumerate() {
        let line = line.map_err(|e| format!("stdin: {e}"))?;
        if line.trim().is_empty() {
            continue;
        }
        let event: MEvent = serde_json::from_str(&line)
            .map_err(|e| format!("stdin line {}: not an event: {e}", lineno + 1))?;
        Persister::persist(&persister, event).map_err(|e| e.to_string())?;
        count += 1;
        if ack {
            out.write_all(b"ok\n").and_then(|_| out.flush()).map_err(|e| e.to_string())?;
        }
    }
    writeln!(out, "persisted {count}").and_then(|_| out.flush()).map_err(|e| e.to_string())
}

/// The seed's per-line decision in `read_and_dedupe_from_top`, line for line:
/// lines split as `BufRead::lines` splits them (a `\n`, or `\r\n`), the
/// `line.trim().is_empty()` blank rule, `serde_json::from_str::<MEvent>`, then
/// the id rule.
fn parse() -> Result<(), String> {
    let mut input = Vec::new();
    io::stdin().read_to_end(&mut input).map_err(|e| format!("stdin: {e}"))?;
    let stdout = io::stdout();
    let mut out = io::BufWriter::new(stdout.lock());
    let mut rest = &input[..];
    while !rest.is_empty() {
        let (line, next) = match rest.iter().position(|&b| b == b'\n') {
            Some(i) => {
                let mut line = &rest[..i];
                if line.last() == Some(&b'\r') {
                    line = &line[..line.len() - 1];
                }
                (line, &rest[i + 1..])
            }
            None => (rest, &rest[rest.len()..]),
        };
        rest = next;
        let verdict = match std::str::from_utf8(line) {
            // What BufRead::lines returns for it, which aborts the seed's replay.
            Err(_) => "abort\tstream did not contain valid UTF-8".to_string(),
            Ok(text) if text.trim().is_empty() => "blank".to_string(),
            Ok(text) => match serde_json::from_str::<MEvent>(text) {
                Ok(event) => match event.item_id() {
                    Some(id) if !id.is_empty() => format!(
                        "ok\t{}\t{}",
                        serde_json::Value::String(event.item_type.clone()),
                        serde_json::Value::String(id.to_string())
                    ),
                    _ => "err\tid".to_string(),
                },
                Err(e) => format!("err\t{}", e.to_string().replace(['\n', '\r', '\t'], " ")),
            },
        };
        writeln!(out, "{verdict}").map_err(|e| e.to_string())?;
    }
    out.flush().map_err(|e| e.to_string())
}

fn follow(log: &str) -> Result<(), String> {
    let persister = Arc::new(DiskPersister::new(log).map_err(|e| format!("open {log}: {e}"))?);
    let ctx = CellServerCtx::new();
    let replayed = persister.replay(&ctx).map_err(|e| format!("replay {log}: {e}"))?;
    ctx.set_echo(true);
    let _watcher = persister
        .start_watcher(ctx.clone())
        .map_err(|e| format!("watch {log}: {e}"))?;
    eprintln!("ready replayed={replayed}");
    // Until stdin closes (or the process is killed).
    let mut sink = Vec::new();
    let _ = io::stdin().read_to_end(&mut sink);
    Ok(())
}
