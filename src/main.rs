//! `relaybox`: the office relay's command line.
//!
//! Exit codes: 0 done, 1 the relay failed while running, 2 bad configuration or usage.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use relaybox::config::Config;
use relaybox::store::users::{check_name, Users};

#[derive(Parser)]
#[command(
    name = "relaybox",
    version,
    about = "Office relay: local MQTT broker with a durable outbox bridged to a NATS hub"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the relay (with no --config, the embedded default: MQTT on 127.0.0.1:1883,
    /// data under ./relaybox-data, no uplink).
    Run {
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Check a config file and exit.
    CheckConfig {
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// Print a summary of a running relay's health (from its admin endpoint).
    Status {
        /// The relay's config (for the admin address; default: the embedded default's).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Print the JSON of /status instead of the summary.
        #[arg(long)]
        json: bool,
    },
    /// Manage the users who may connect (kept in the store under data_dir).
    User {
        /// The config whose data_dir holds the users (default: the embedded default's).
        #[arg(long, value_name = "FILE", global = true)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        action: UserAction,
    },
}

#[derive(Subcommand)]
enum UserAction {
    /// Add a user; the password is asked for, or read from standard input.
    Add {
        name: String,
        /// Read the password from the first line of standard input.
        #[arg(long)]
        password_stdin: bool,
    },
    /// Change a user's password.
    Passwd {
        name: String,
        #[arg(long)]
        password_stdin: bool,
    },
    /// Remove a user.
    Del { name: String },
    /// List the users.
    List,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { file } => match Config::load(&file) {
            Ok(_) => {
                println!("{}: ok", file.display());
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("{error}");
                ExitCode::from(2)
            }
        },
        Command::User { config, action } => user(config, action),
        Command::Status { config, json } => status(config, json),
        Command::Run { config } => {
            let config = match load_config(config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            init_logging();
            match run(config) {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    tracing::error!("{error:#}");
                    eprintln!("relaybox: {error:#}");
                    ExitCode::from(1)
                }
            }
        }
    }
}

/// The config file given, or the embedded default; a bad file is reported (exit code 2).
fn load_config(path: Option<PathBuf>) -> Result<Config, ExitCode> {
    match path {
        Some(path) => Config::load(&path).map_err(|error| {
            eprintln!("{error}");
            ExitCode::from(2)
        }),
        None => Ok(Config::embedded_default()),
    }
}

fn status(config: Option<PathBuf>, json: bool) -> ExitCode {
    let config = match load_config(config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let fetched = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
        .and_then(|rt| rt.block_on(relaybox::admin::fetch_status(config.admin.listen)));
    match fetched {
        Ok(s) if json => {
            println!("{}", serde_json::to_string_pretty(&s).unwrap_or_default());
            ExitCode::SUCCESS
        }
        Ok(s) => {
            print!("{}", relaybox::admin::summary(&s));
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("relaybox: {error}");
            ExitCode::from(1)
        }
    }
}

fn user(config: Option<PathBuf>, action: UserAction) -> ExitCode {
    let config = match load_config(config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let users = Users::at(&config.relay.data_dir);
    let result = match action {
        UserAction::Add {
            name,
            password_stdin,
        } => check_name(&name)
            .map_err(|e| e.to_string())
            .and_then(|()| read_password(password_stdin))
            .and_then(|p| users.add(&name, &p).map_err(|e| e.to_string()))
            .map(|()| println!("user {name} added")),
        UserAction::Passwd {
            name,
            password_stdin,
        } => read_password(password_stdin)
            .and_then(|p| users.set_password(&name, &p).map_err(|e| e.to_string()))
            .map(|()| println!("password of {name} changed")),
        UserAction::Del { name } => users
            .delete(&name)
            .map_err(|e| e.to_string())
            .map(|()| println!("user {name} removed")),
        UserAction::List => users.list().map_err(|e| e.to_string()).map(|names| {
            for n in names {
                println!("{n}");
            }
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("relaybox: {error}");
            ExitCode::from(1)
        }
    }
}

/// A new password: the first line of standard input, or asked for twice on the terminal.
fn read_password(from_stdin: bool) -> Result<String, String> {
    if from_stdin {
        let mut line = String::new();
        std::io::stdin()
            .read_line(&mut line)
            .map_err(|e| format!("cannot read the password from standard input: {e}"))?;
        let password = line.trim_end_matches(['\n', '\r']).to_owned();
        if password.is_empty() {
            return Err("the password on standard input is empty".into());
        }
        return Ok(password);
    }
    let first = rpassword::prompt_password("Password: ").map_err(|e| {
        format!("cannot read the password (use --password-stdin without a terminal): {e}")
    })?;
    let second = rpassword::prompt_password("Again: ").map_err(|e| e.to_string())?;
    if first != second {
        return Err("the two passwords differ".into());
    }
    if first.is_empty() {
        return Err("the password is empty".into());
    }
    Ok(first)
}

/// Arenas glibc's allocator may use at most. By default it makes up to 8 per core, one more for
/// each thread that meets contention. On a relay whose few threads take turns (two runtime
/// workers, the committer, short blocking tasks) every arena only adds its own high-water mark
/// of free memory to the RSS: under a 4-publisher load, 18.3 MiB with 2 arenas against 15.3 MiB
/// with one, at the same throughput (docs/BENCHMARKS.md).
const MALLOC_ARENAS: i32 = 1;

/// Caps glibc's allocator arenas at [`MALLOC_ARENAS`], before the runtime starts its threads.
/// `MALLOC_ARENA_MAX` in the environment still wins, as glibc reads it at its first allocation.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt changes one parameter of the allocator under the allocator's own
        // lock, and takes no pointers; it runs before the runtime starts its threads.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, MALLOC_ARENAS);
        }
    }
}

fn run(config: Config) -> anyhow::Result<()> {
    limit_malloc_arenas();
    // One TLS backend for the whole process (ring: it cross-builds for armv7), so that no
    // dependency enabling another one can leave rustls without a default.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("relaybox")
        .build()?;
    // Catch SIGTERM and SIGINT from now on, not only once the stop future is first polled
    // (after the relay is up): a stop that comes right after READY=1 must drain, not kill.
    let stop = {
        let _runtime = runtime.enter();
        stop_signal()
    };
    runtime.block_on(relaybox::app::run(config, stop))
}

/// Resolves on SIGTERM or SIGINT. The handlers are installed when this is called (inside the
/// runtime), before the returned future runs.
fn stop_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        match (term, int) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            (Ok(mut term), Err(error)) => {
                tracing::warn!(%error, "cannot watch SIGINT; stopping on SIGTERM only");
                term.recv().await;
            }
            (Err(error), Ok(mut int)) => {
                tracing::warn!(%error, "cannot watch SIGTERM; stopping on SIGINT only");
                int.recv().await;
            }
            (Err(error), Err(_)) => {
                tracing::error!(%error, "cannot watch SIGTERM or SIGINT; they will stop the relay without a drain");
                std::future::pending::<()>().await;
            }
        }
    }
}

/// async-nats logs every reconnect attempt; the uplink logs what matters about the hub link.
const DEFAULT_LOG_FILTER: &str = "info,async_nats=warn";

/// Logs to journald (with fields) when stderr is systemd's journal stream, else to stderr;
/// warnings and errors are also kept for the admin page (`relaybox::warnings`).
fn init_logging() {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG_FILTER));
    let kept = relaybox::warnings::Layer;
    if relaybox::systemd::stderr_is_journal() {
        match relaybox::systemd::journald_layer() {
            Ok(journald) => {
                tracing_subscriber::registry()
                    .with(filter)
                    .with(journald)
                    .with(kept)
                    .init();
                return;
            }
            // The stream still reaches the journal, without fields.
            Err(error) => eprintln!("relaybox: cannot log to journald ({error}); using stderr"),
        }
    }
    tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .with_writer(std::io::stderr),
        )
        .with(kept)
        .init();
}
