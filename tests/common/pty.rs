//! A pseudo-terminal standing in for a device on a serial port (tests/serial.rs, tests/modbus.rs).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;

use tokio::io::unix::AsyncFd;

/// A pseudo-terminal pair opened with close-on-exec. (`SerialStream::pair()` opens both ends
/// without it, so every relay or nats-server that a test running in parallel spawns inherits
/// the device end, and closing it no longer hangs the line up: an unplug would go unseen.)
pub struct Pty {
    /// The device's end.
    pub master: AsyncFd<OwnedFd>,
    /// The relay's end, kept open here only to see how much the relay has not read yet.
    pub slave: OwnedFd,
    pub slave_path: PathBuf,
}

pub fn check(rc: libc::c_int, what: &str) -> libc::c_int {
    assert!(rc >= 0, "{what}: {}", std::io::Error::last_os_error());
    rc
}

impl Pty {
    pub fn open() -> Pty {
        // SAFETY: plain libc calls on descriptors owned here; every result is checked, and the
        // buffer given to ptsname_r is NUL-terminated on success.
        unsafe {
            let m = check(
                libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC),
                "posix_openpt",
            );
            let master = OwnedFd::from_raw_fd(m);
            check(libc::grantpt(m), "grantpt");
            check(libc::unlockpt(m), "unlockpt");
            let mut name = [0 as libc::c_char; 128];
            assert_eq!(
                libc::ptsname_r(m, name.as_mut_ptr(), name.len()),
                0,
                "ptsname_r"
            );
            let name = std::ffi::CStr::from_ptr(name.as_ptr()).to_owned();
            let s = check(
                libc::open(
                    name.as_ptr(),
                    libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
                ),
                "open pty slave",
            );
            let slave = OwnedFd::from_raw_fd(s);
            // Raw from the start (no echo, no line editing), as the relay will set it too.
            let mut t: libc::termios = std::mem::zeroed();
            check(libc::tcgetattr(s, &mut t), "tcgetattr");
            libc::cfmakeraw(&mut t);
            check(libc::tcsetattr(s, libc::TCSANOW, &t), "tcsetattr");
            let flags = check(libc::fcntl(m, libc::F_GETFL), "F_GETFL");
            check(
                libc::fcntl(m, libc::F_SETFL, flags | libc::O_NONBLOCK),
                "F_SETFL",
            );
            Pty {
                // The OwnedFd is valid, and AsyncFd owns it until it is dropped.
                master: AsyncFd::register(master).expect("register pty master"),
                slave,
                slave_path: PathBuf::from(name.to_string_lossy().into_owned()),
            }
        }
    }

    pub async fn write(&self, bytes: &[u8]) -> std::io::Result<usize> {
        loop {
            let mut ready = self.master.writable().await?;
            // SAFETY: write(2) from a live slice into a descriptor owned by `self`.
            let done = ready.try_io(|fd| {
                let n = unsafe { libc::write(fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len()) };
                if n < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            if let Ok(result) = done {
                return result;
            }
        }
    }

    pub async fn read(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            let mut ready = self.master.readable().await?;
            // SAFETY: read(2) into a live mutable slice from a descriptor owned by `self`.
            let done = ready.try_io(|fd| {
                let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
                if n < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            if let Ok(result) = done {
                return result;
            }
        }
    }

    /// Bytes written by the device that the relay has not read yet.
    pub fn unread(&self) -> usize {
        let mut n: libc::c_int = 0;
        // SAFETY: FIONREAD stores an int through the pointer given.
        check(
            unsafe { libc::ioctl(self.slave.as_raw_fd(), libc::FIONREAD, &mut n) },
            "FIONREAD",
        );
        usize::try_from(n).unwrap_or(0)
    }
}
