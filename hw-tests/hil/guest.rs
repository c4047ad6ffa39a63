//! One ARM guest: the test image (hw-tests/image/) booted with `qemu-system-aarch64 -M virt`.
//!
//! The board: 2 Cortex-A72 cores, 512 MiB, the console on a PCI UART (ttyS0) written to a file
//! per boot, the store on a virtio-blk disk opened `cache=none` (QEMU keeps no write cache of its
//! own, so SIGKILL of QEMU loses exactly what the guest had not flushed: a power cut), user-mode
//! networking with the guest's MQTT port forwarded to a free port on 127.0.0.1 (the guest
//! reaches the host's hub as 10.0.2.2), and the board's PL011 UART (ttyAMA0, the sensor port)
//! wired to a host Unix socket when a test asks for it.
//!
//! Readiness is the `relaybox ready` line on the console, never a sleep. Every wait is bounded
//! and a failure message carries the end of the console log; the logs stay under
//! `target/hw-artefacts/<test>/`.

use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::common::{free_port, send_signal, strip_ansi, tail, wait_exit};

/// The QEMU system emulator (package qemu-system-arm).
pub const QEMU: &str = "qemu-system-aarch64";
/// How long a boot to `relaybox ready` may take (TCG emulation on a busy 2-core machine).
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(90);
/// The line relaybox logs once its listener is bound and its store is open.
pub const READY_LINE: &str = "relaybox ready";

/// The cargo target directory this test binary was built in (`<target>/<profile>/deps/hil-*`).
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    exe.ancestors()
        .nth(3)
        .expect("test binary lives in <target>/<profile>/deps")
        .to_path_buf()
}

/// A fresh, empty artefact directory for `test`: `<target>/hw-artefacts/<test>`.
pub fn artefacts(test: &str) -> PathBuf {
    let dir = target_dir().join("hw-artefacts").join(test);
    if dir.exists() {
        fs::remove_dir_all(&dir).expect("clear artefact dir");
    }
    fs::create_dir_all(&dir).expect("artefact dir");
    dir
}

/// The built test image (hw-tests/image/build).
pub struct Image {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub store_template: PathBuf,
    /// The kernel release the image pins (the guest must report it).
    pub kernel_release: String,
}

impl Image {
    /// The image in `$RELAYBOX_HW_IMAGE`, or `<target>/hw-image`. Panics when it is missing:
    /// `hw-tests/run` builds it (and the cross-built binary it holds) before the tests.
    pub fn get() -> &'static Image {
        static IMAGE: OnceLock<Image> = OnceLock::new();
        IMAGE.get_or_init(|| {
            let dir = std::env::var_os("RELAYBOX_HW_IMAGE")
                .map(PathBuf::from)
                .unwrap_or_else(|| target_dir().join("hw-image"));
            let image = Image {
                kernel: dir.join("vmlinuz"),
                initrd: dir.join("initrd.img"),
                store_template: dir.join("store.img"),
                kernel_release: fs::read_to_string(dir.join("manifest"))
                    .ok()
                    .and_then(|m| {
                        m.lines()
                            .find_map(|l| l.strip_prefix("kernel"))
                            .and_then(|l| l.split_whitespace().next().map(str::to_owned))
                    })
                    .unwrap_or_default(),
            };
            for f in [&image.kernel, &image.initrd, &image.store_template] {
                assert!(
                    f.is_file(),
                    "{} is missing: run hw-tests/run (it cross-builds relaybox and builds the image)",
                    f.display()
                );
            }
            assert!(
                !image.kernel_release.is_empty(),
                "no kernel line in {}/manifest",
                dir.display()
            );
            image
        })
    }
}

/// How the guest's sensor UART (PL011, ttyAMA0) is wired on the host.
#[derive(Debug, Clone)]
pub enum SensorPort {
    /// Not connected.
    None,
    /// A Unix socket QEMU listens on; the test connects and writes frames into it.
    Socket(PathBuf),
    /// The same, with the guest's relay using the UART as a Modbus RTU bus (`rbx.uart=modbus`);
    /// the test joins the socket to simulated devices.
    Modbus(PathBuf),
}

/// The image's log-writes mode (`rbx.logwrites=1`, hw-tests/image/init): the store's disk is
/// used through device-mapper's `log-writes` target, which records every write and flush on
/// `log_disk`; the host places marks in that log by writing lines into `marks`, a Unix socket
/// QEMU listens on (the guest's virtio-serial port `rbx.marks`).
#[derive(Debug, Clone)]
pub struct LogWrites {
    pub log_disk: PathBuf,
    pub marks: PathBuf,
}

/// A guest with its own store disk; it can be booted, power-cut and booted again.
pub struct Guest {
    dir: PathBuf,
    /// The store's disk image (a copy of the image's blank ext4 template).
    pub disk: PathBuf,
    /// The host port forwarded to the guest's MQTT listener (127.0.0.1 only).
    pub mqtt_port: u16,
    pub hub_port: u16,
    pub sensor: SensorPort,
    pub logwrites: Option<LogWrites>,
    child: Option<Child>,
    boots: usize,
    started: Instant,
}

impl Guest {
    /// A guest whose artefacts (console logs, disk) live in `dir`, whose hub listens on
    /// 127.0.0.1:`hub_port` on the host.
    pub fn new(dir: &Path, hub_port: u16) -> Guest {
        let image = Image::get();
        let disk = dir.join("store.img");
        // Sparse copy: the 64 MiB template is almost all holes.
        let status = Command::new("cp")
            .arg("--sparse=always")
            .arg(&image.store_template)
            .arg(&disk)
            .status()
            .expect("run cp");
        assert!(status.success(), "copying the store template failed");
        Guest {
            dir: dir.to_path_buf(),
            disk,
            mqtt_port: free_port(),
            hub_port,
            sensor: SensorPort::None,
            logwrites: None,
            child: None,
            boots: 0,
            started: Instant::now(),
        }
    }

    /// Time since QEMU was started for the current boot.
    pub fn since_boot(&self) -> Duration {
        self.started.elapsed()
    }

    fn console_path(&self, boot: usize) -> PathBuf {
        self.dir.join(format!("console-{boot}.log"))
    }

    fn stderr_path(&self, boot: usize) -> PathBuf {
        self.dir.join(format!("qemu-{boot}.stderr"))
    }

    /// The console output of the current (or last) boot, colour codes removed.
    pub fn console(&self) -> String {
        strip_ansi(&read_lossy(&self.console_path(self.boots)))
    }

    fn failure_report(&self) -> String {
        format!(
            "console ({}):\n{}\nqemu stderr:\n{}",
            self.console_path(self.boots).display(),
            tail(&self.console(), 40),
            tail(&read_lossy(&self.stderr_path(self.boots)), 10)
        )
    }

    /// Starts QEMU (the guest must not be running). Returns at once; see [`Guest::wait_ready`].
    pub fn boot(&mut self) {
        assert!(self.child.is_none(), "guest is already running");
        let image = Image::get();
        self.boots += 1;
        let console = self.console_path(self.boots);
        let stderr = File::create(self.stderr_path(self.boots)).expect("qemu stderr file");
        let mut cmd = Command::new(QEMU);
        cmd.args(["-M", "virt", "-cpu", "cortex-a72", "-smp", "2", "-m", "512"])
            .args(["-nodefaults", "-display", "none", "-no-reboot"])
            .arg("-kernel")
            .arg(&image.kernel)
            .arg("-initrd")
            .arg(&image.initrd)
            .arg("-append")
            .arg(format!(
                "console=ttyS0 quiet panic=-1 rbx.hub_port={}{}{}",
                self.hub_port,
                if self.logwrites.is_some() {
                    " rbx.logwrites=1"
                } else {
                    ""
                },
                if matches!(self.sensor, SensorPort::Modbus(_)) {
                    " rbx.uart=modbus"
                } else {
                    ""
                }
            ))
            // The console: a PCI 16550 (ttyS0), so that the PL011 stays free for the sensor.
            .arg("-chardev")
            .arg(format!("file,id=con,path={}", console.display()))
            .args(["-device", "pci-serial,chardev=con"])
            .args([
                "-netdev",
                &format!(
                    "user,id=net0,hostfwd=tcp:127.0.0.1:{}-:1883",
                    self.mqtt_port
                ),
                "-device",
                "virtio-net-pci,netdev=net0",
            ])
            .arg("-drive")
            .arg(format!(
                "file={},format=raw,if=none,id=store,cache=none,aio=threads",
                self.disk.display()
            ))
            // The serial lets the log-writes mode tell its two disks apart.
            .args(["-device", "virtio-blk-pci,drive=store,serial=rbx-data"])
            .args(["-device", "virtio-rng-pci"]);
        if let Some(lw) = &self.logwrites {
            // The log disk needs no care: QEMU exits normally once the target has written it.
            cmd.arg("-drive")
                .arg(format!(
                    "file={},format=raw,if=none,id=log,cache=unsafe",
                    lw.log_disk.display()
                ))
                .args(["-device", "virtio-blk-pci,drive=log,serial=rbx-log"])
                .args(["-device", "virtio-serial-pci,id=vser"])
                .arg("-chardev")
                .arg(format!(
                    "socket,id=marks,path={},server=on,wait=off",
                    lw.marks.display()
                ))
                .args([
                    "-device",
                    "virtserialport,bus=vser.0,chardev=marks,name=rbx.marks",
                ]);
        }
        match &self.sensor {
            SensorPort::None => {
                cmd.args(["-serial", "null"]);
            }
            SensorPort::Socket(path) | SensorPort::Modbus(path) => {
                // QEMU listens; the test connects. `wait=off`: the guest boots without waiting.
                cmd.arg("-chardev")
                    .arg(format!(
                        "socket,id=sensor,path={},server=on,wait=off",
                        path.display()
                    ))
                    .args(["-serial", "chardev:sensor"]);
            }
        }
        cmd.stdin(Stdio::null())
            .stdout(stderr.try_clone().expect("stderr fd"))
            .stderr(stderr);
        self.started = Instant::now();
        self.child = Some(cmd.spawn().expect("spawn qemu-system-aarch64"));
    }

    /// Waits for `relaybox ready` on the console of the current boot; returns the time since
    /// QEMU was started. Panics (with the console) if QEMU exits, the guest's init reports a
    /// fatal error, or the line does not come within [`BOOT_TIMEOUT`].
    pub async fn wait_ready(&mut self) -> Duration {
        let deadline = Instant::now() + BOOT_TIMEOUT;
        let mut port_retries = 0;
        loop {
            let console = self.console();
            if console.contains(READY_LINE) {
                return self.started.elapsed();
            }
            if console.contains("relaybox-hw: FATAL") || console.contains("Kernel panic") {
                panic!(
                    "guest boot {} failed; {}",
                    self.boots,
                    self.failure_report()
                );
            }
            let exited = self
                .child
                .as_mut()
                .expect("guest is not running")
                .try_wait()
                .expect("try_wait qemu");
            if let Some(status) = exited {
                self.child = None;
                // The free port was taken by someone else between choosing and binding it
                // (other test runs share the machine): choose another, at most twice.
                let stderr = read_lossy(&self.stderr_path(self.boots));
                if stderr.contains("host forwarding rule") && port_retries < 2 {
                    port_retries += 1;
                    self.mqtt_port = free_port();
                    self.boot();
                    continue;
                }
                panic!(
                    "qemu exited ({status}) during boot {}; {}",
                    self.boots,
                    self.failure_report()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no `{READY_LINE}` within {BOOT_TIMEOUT:?} of boot {}; {}",
                self.boots,
                self.failure_report()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Boots and waits for readiness; returns the boot-to-ready time.
    pub async fn boot_ready(&mut self) -> Duration {
        self.boot();
        self.wait_ready().await
    }

    /// The power cut: SIGKILL of QEMU. Whatever the guest had not flushed to its disk is gone.
    pub async fn power_cut(&mut self) {
        let mut child = self.child.take().expect("guest is not running");
        send_signal(&child, libc::SIGKILL);
        assert!(
            wait_exit(&mut child, Duration::from_secs(10))
                .await
                .is_some(),
            "qemu survived SIGKILL"
        );
    }

    /// Waits (bounded) for the guest to power itself off; panics with the console otherwise.
    pub async fn wait_poweroff(&mut self, timeout: Duration) {
        let mut child = self.child.take().expect("guest is not running");
        if wait_exit(&mut child, timeout).await.is_none() {
            self.child = Some(child);
            panic!(
                "the guest did not power off within {timeout:?}; {}",
                self.failure_report()
            );
        }
    }

    /// Asserts the guest is still running (relaybox has not exited, the kernel did not panic).
    pub fn assert_alive(&mut self) {
        let exited = self
            .child
            .as_mut()
            .expect("guest is not running")
            .try_wait()
            .expect("try_wait qemu");
        if let Some(status) = exited {
            self.child = None;
            panic!("qemu exited ({status}); {}", self.failure_report());
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() && self.boots > 0 {
            eprintln!(
                "guest console of the failed test (boot {}):\n{}",
                self.boots,
                tail(&self.console(), 60)
            );
        }
    }
}

fn read_lossy(path: &Path) -> String {
    let mut bytes = Vec::new();
    if let Ok(mut f) = File::open(path) {
        let _ = f.read_to_end(&mut bytes);
    }
    String::from_utf8_lossy(&bytes).into_owned()
}
