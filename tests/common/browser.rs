//! The browser scripts of `tests/browser/` (node, playwright-core, Debian's Chromium): started
//! with their arguments, followed by the stage lines they print, told to go on through stdin.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::time::Duration;

/// Where a test keeps what it leaves to look at (screenshots): `target/test-artefacts/<name>`.
pub fn artefacts(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target/test-artefacts")
        .join(name);
    std::fs::create_dir_all(&dir).expect("artefact dir");
    dir
}

/// A running browser script.
pub struct Browser {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: tokio::sync::mpsc::UnboundedReceiver<String>,
    /// Every line it printed so far.
    pub seen: Vec<String>,
    /// How long it may take to reach one stage.
    stage_timeout: Duration,
}

impl Browser {
    /// Starts `tests/browser/<script>` with `args`.
    pub fn start(script: &str, args: &[&str], stage_timeout: Duration) -> Browser {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        for dir in ["tests/browser", "examples/office-chat"] {
            assert!(
                root.join(dir).join("node_modules").is_dir(),
                "{dir}/node_modules is missing: run `npm ci --prefix {dir}` (scripts/test does)"
            );
        }
        let mut child = Command::new("node")
            .arg(root.join("tests/browser").join(script))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn node (scripts/test installs it)");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = tokio::sync::mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Browser {
            stdin: child.stdin.take(),
            child,
            lines,
            seen: Vec::new(),
            stage_timeout,
        }
    }

    /// Waits for the line that starts with `stage` and returns it. A line starting with `FAIL`
    /// (with the failure lines that follow it), the script's end or a timeout panics with
    /// everything it said.
    pub async fn reached(&mut self, stage: &str) -> String {
        let deadline = tokio::time::Instant::now() + self.stage_timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Ok(Some(line)) => {
                    self.seen.push(line.clone());
                    if line.starts_with("FAIL") {
                        while let Ok(Some(more)) =
                            tokio::time::timeout(Duration::from_secs(5), self.lines.recv()).await
                        {
                            self.seen.push(more);
                        }
                        panic!("the browser failed at {stage:?}; it said: {:#?}", self.seen);
                    }
                    if line.starts_with(stage) {
                        return line;
                    }
                }
                Ok(None) => panic!(
                    "the browser ended before {stage:?}; it said: {:#?}",
                    self.seen
                ),
                Err(_) => panic!(
                    "the browser did not reach {stage:?} within {:?}; it said: {:#?}",
                    self.stage_timeout, self.seen
                ),
            }
        }
    }

    /// Tells the script to go on (a line on its stdin).
    pub fn tell(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin");
        writeln!(stdin, "{line}").expect("tell the browser");
    }

    /// Waits for the script to end (after its last stage) and asserts that it succeeded.
    pub fn finished(&mut self) {
        drop(self.stdin.take());
        let status: ExitStatus =
            tokio::task::block_in_place(|| self.child.wait()).expect("node exit");
        assert!(
            status.success(),
            "the browser script failed: {:#?}",
            self.seen
        );
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
