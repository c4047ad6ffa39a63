//! Simulated Modbus RTU devices: `tests/modbus/device.py` (pymodbus, pinned in
//! tests/interop/requirements.txt) serving units with RTU framing on a TCP port on 127.0.0.1,
//! controlled by lines on its stdin (tests/modbus.rs, the HIL suite).

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout};

const WAIT: Duration = Duration::from_secs(20);

pub struct Sim {
    child: Child,
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
    /// Where the devices listen (RTU frames over TCP).
    pub port: u16,
}

impl Sim {
    /// Starts the units (`"1,2"`) and returns once they listen.
    pub async fn start(units: &str) -> Sim {
        let python = tokio::task::spawn_blocking(super::interop_python)
            .await
            .expect("device python");
        let port = super::free_port();
        let mut child = tokio::process::Command::new(python)
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/modbus/device.py"
            ))
            .args(["--port", &port.to_string(), "--units", units])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start the simulated devices");
        let stdin = child.stdin.take().expect("stdin");
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let ready = tokio::time::timeout(WAIT, stdout.next_line())
            .await
            .expect("the simulated devices did not start within 20 s")
            .expect("read the simulator")
            .unwrap_or_default();
        assert_eq!(ready, "ready");
        Sim {
            child,
            stdin,
            stdout,
            port,
        }
    }

    /// A new connection to the devices: the far end of the bus.
    pub async fn connect(&self) -> tokio::net::TcpStream {
        tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .expect("connect to the simulated devices")
    }

    /// Sends a control line; returns what follows "ok".
    pub async fn cmd(&mut self, line: &str) -> String {
        self.stdin
            .write_all(format!("{line}\n").as_bytes())
            .await
            .expect("write to the simulator");
        let reply = tokio::time::timeout(WAIT, self.stdout.next_line())
            .await
            .unwrap_or_else(|_| panic!("no reply to {line:?} within 20 s"))
            .expect("read the simulator")
            .unwrap_or_default();
        let Some(rest) = reply.strip_prefix("ok") else {
            panic!("{line:?}: {reply}");
        };
        rest.trim().to_owned()
    }

    /// Read requests `unit` has answered.
    pub async fn reads(&mut self, unit: u8) -> u64 {
        self.cmd(&format!("reads {unit}"))
            .await
            .parse()
            .expect("a count")
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}
