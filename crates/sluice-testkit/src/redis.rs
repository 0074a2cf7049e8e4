//! A real `redis-server` per test, on a free loopback port.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A `redis-server` child process on `127.0.0.1:<free port>`, with no persistence. Killed
/// (and reaped) on drop.
#[derive(Debug)]
pub struct RedisServer {
    child: Child,
    port: u16,
}

impl RedisServer {
    /// Starts `redis-server` (from `PATH`) with `extra` arguments appended, and returns once it
    /// answers `PING`.
    ///
    /// # Errors
    /// When `redis-server` is missing, exits, or never becomes ready.
    pub fn start_with(extra: &[&str]) -> io::Result<Self> {
        let mut last_err = None;
        // The port is free when we pick it but could be taken before redis binds it; a new
        // port on that (rare) failure beats a flaky test.
        for _ in 0..5 {
            let port = free_port()?;
            match Self::spawn(port, extra) {
                Ok(server) => return Ok(server),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or_else(|| io::Error::other("redis-server did not start")))
    }

    /// [`Self::start_with`] no extra arguments.
    ///
    /// # Errors
    /// As [`Self::start_with`].
    pub fn start() -> io::Result<Self> {
        Self::start_with(&[])
    }

    fn spawn(port: u16, extra: &[&str]) -> io::Result<Self> {
        let child = spawn_ready(port, extra)?;
        Ok(Self { child, port })
    }

    /// Kills the server (as a crash would), keeping its port for [`Self::restart`].
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts a fresh, empty server on the same port.
    ///
    /// # Errors
    /// When it does not come up.
    pub fn restart(&mut self, extra: &[&str]) -> io::Result<()> {
        self.kill();
        self.child = spawn_ready(self.port, extra)?;
        Ok(())
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Sends `PING` over a fresh connection.
    ///
    /// # Errors
    /// When the server does not answer `+PONG`.
    pub fn ping(&mut self) -> io::Result<()> {
        ping(self.port)
    }
}

/// Runs `redis-server` on `port` and returns once it answers `PING`.
fn spawn_ready(port: u16, extra: &[&str]) -> io::Result<Child> {
    let mut child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no", "--logfile", ""])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| io::Error::new(e.kind(), format!("cannot run redis-server: {e}")))?;
    // Readiness is redis's own log line, not a guess of how long start-up takes.
    let ready = child.stdout.take().map(|out| {
        let mut lines = BufReader::new(out).lines();
        let ready = lines
            .by_ref()
            .map_while(Result::ok)
            .any(|line| line.contains("Ready to accept connections"));
        // Keep draining so redis never writes its log into a closed pipe.
        std::thread::spawn(move || lines.for_each(drop));
        ready
    });
    if ready == Some(true) && ping(port).is_ok() {
        Ok(child)
    } else {
        let _ = child.kill();
        let _ = child.wait();
        Err(io::Error::other(format!(
            "redis-server on port {port} did not start"
        )))
    }
}

fn ping(port: u16) -> io::Result<()> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"PING\r\n")?;
    let mut buf = [0u8; 7];
    s.read_exact(&mut buf)?;
    if &buf == b"+PONG\r\n" {
        Ok(())
    } else {
        Err(io::Error::other("unexpected PING answer"))
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback port that was free a moment ago.
///
/// # Errors
/// When no socket can be bound.
pub fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_answers_and_stops() {
        let mut r = RedisServer::start().unwrap();
        r.ping().unwrap();
        let port = r.port();
        assert!(r.url().ends_with(&port.to_string()));
        drop(r);
        assert!(
            TcpStream::connect(("127.0.0.1", port)).is_err(),
            "still listening after drop"
        );
    }
}
