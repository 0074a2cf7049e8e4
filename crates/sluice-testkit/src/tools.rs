//! Command-line tools tests drive: `openssl` for a certificate, `curl` for HTTP/2 and TLS
//! clients (reqwest is built without TLS or HTTP/2 here).

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

/// A directory of its own under the system temp dir, for one test's files; removed, with
/// everything in it, when dropped (a test that fails still cleans up: its values are dropped
/// while the panic unwinds). Derefs to its [`Path`].
#[derive(Debug)]
pub struct ScratchDir(PathBuf);

impl ScratchDir {
    /// Creates `sluice-{tag}-{pid}-{random}` under the temp dir.
    ///
    /// # Errors
    /// When it cannot be created.
    pub fn new(tag: &str) -> io::Result<Self> {
        use std::hash::{BuildHasher, Hasher};
        let unique = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        let dir =
            std::env::temp_dir().join(format!("sluice-{tag}-{}-{unique:x}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        Ok(Self(dir))
    }
}

impl std::ops::Deref for ScratchDir {
    type Target = Path;

    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for ScratchDir {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        // Best effort: a file a child process still holds open is removed all the same on
        // Linux; nothing else can make this fail in a directory of our own.
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn failed(what: &str, out: &std::process::Output) -> io::Error {
    io::Error::other(format!(
        "{what} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    ))
}

/// A self-signed certificate for `localhost` and `127.0.0.1` (one day, RSA 2048), made with
/// `openssl` in `dir`: the (cert, key) PEM paths. A client trusts it as its own anchor with
/// `curl --cacert cert`, or Sluice with `SSL_CERT_FILE=cert`.
///
/// # Errors
/// When `openssl` cannot be run or fails.
pub fn self_signed_cert(dir: &Path) -> io::Result<(PathBuf, PathBuf)> {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let out = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=localhost"])
        .args(["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"])
        // An end-entity certificate: webpki (rustls, Sluice's upstream client) refuses a CA
        // certificate presented by a server (`CaUsedAsEndEntity`).
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()?;
    if !out.status.success() {
        return Err(failed("openssl req", &out));
    }
    Ok((cert, key))
}

/// Runs `curl -sS --max-time 20` with `args`: (`%{http_version} %{http_code}`, body), e.g.
/// `("2 200", "{…}")`. The body goes through a file in `dir`, so it is whole whatever it is.
///
/// # Errors
/// When curl cannot be run or fails (no connection, TLS refused, timeout).
pub fn curl(dir: &Path, args: &[&str]) -> io::Result<(String, String)> {
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let path = dir.join(format!("body-{}", CALLS.fetch_add(1, Ordering::Relaxed)));
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "20", "-o"])
        .arg(&path)
        .args(["-w", "%{http_version} %{http_code}"])
        .args(args)
        .output()?;
    if !out.status.success() {
        return Err(failed("curl", &out));
    }
    let text = std::fs::read_to_string(&path)?;
    let _ = std::fs::remove_file(&path);
    Ok((String::from_utf8_lossy(&out.stdout).into_owned(), text))
}
