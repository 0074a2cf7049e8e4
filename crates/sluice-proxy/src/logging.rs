//! Log output in batches. `env_logger` writes (and flushes) every record on its own, which
//! costs a `write(2)` per access-log line, i.e. per request. Here records collect in a buffer
//! per thread that a background thread writes to stderr every [`INTERVAL`] (or the thread
//! itself, at once, past `HIGH_WATER`), so a busy gateway makes ten writes a second, not one
//! per request. Each thread's lines keep their order; lines of different threads come out a
//! thread's batch after another, so they may be out of order by up to an interval. [`flush`]
//! empties the buffers (Sluice calls it before exiting); what a crash leaves in them, at most
//! one interval's worth, is lost.
//!
//! Access-log lines (one per request) skip `env_logger`'s formatter: [`access_line`] writes the
//! same `[timestamp LEVEL target] message` line straight into the batch, with the timestamp
//! formatted once a second per thread and the message serialized in place (no `String` per
//! line). `env_logger`'s per-record formatting was ~4 % of a request's instructions.

use std::cell::{OnceCell, RefCell};
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

use crate::lock;

/// How often buffered records reach stderr.
pub const INTERVAL: Duration = Duration::from_millis(100);
/// A thread's buffer this large is written at once, by that thread.
const HIGH_WATER: usize = 64 * 1024;

/// One thread's records not yet written. Only its thread appends, so its lock is uncontended
/// but for the writer taking the records out once an interval. (One buffer shared by every
/// worker cost a contended lock and a cache line passed between cores on every request: with
/// two workers the append was 0.65 % of Sluice's CPU, two thirds of it on the lock's release.)
type Shard = Arc<Mutex<Buffers>>;

/// A thread's records and the buffer they move to next: batches alternate between the two, so
/// a busy thread reuses the same memory instead of growing a new buffer for every batch.
#[derive(Default)]
struct Buffers {
    lines: Vec<u8>,
    spare: Vec<u8>,
}

/// A written batch's buffer is kept as the spare up to this size (a burst of huge lines is
/// not held on to).
const KEEP: usize = 4 * HIGH_WATER;

struct Sink {
    /// The shard of every thread that logged and is alive, or still has records.
    shards: Mutex<Vec<Shard>>,
    /// Held while writing, so a thread's batches reach stderr in the order they were taken.
    out: Mutex<()>,
}

static SINK: OnceLock<Sink> = OnceLock::new();

thread_local! {
    /// This thread's shard, registered in the sink on first use.
    static SHARD: OnceCell<Shard> = const { OnceCell::new() };
}

/// Set by [`init`]: records go to the batch (else, e.g. in tests, to whatever logger is set).
static BATCHED: AtomicBool = AtomicBool::new(false);

/// The access log's target (and its filter directive: `sluice::access=info`).
pub const ACCESS_TARGET: &str = "sluice::access";

fn sink() -> &'static Sink {
    SINK.get_or_init(|| Sink {
        shards: Mutex::new(Vec::new()),
        out: Mutex::new(()),
    })
}

/// Writes whatever is buffered to stderr now.
pub fn flush() {
    with_output(drain);
}

/// Runs `write` with the output: the sink's order lock taken, then stderr's (in tests, a
/// buffer the test reads). Every write to the output goes through here, so the two locks are
/// always taken in this order. (`flush` once took stderr's lock first and then the order lock,
/// while a thread past `HIGH_WATER` took them the other way round: under load the log thread
/// and the workers deadlocked, and the whole proxy stopped.)
fn with_output(write: impl FnOnce(&mut dyn Write)) {
    let _order = lock(&sink().out);
    #[cfg(not(test))]
    {
        let mut err = std::io::stderr().lock();
        write(&mut err);
        let _ = err.flush();
    }
    #[cfg(test)]
    write(&mut *lock(&tests::OUTPUT));
}

/// Moves every thread's records to `out` (the caller holds the order lock: [`with_output`]):
/// each thread's in the order it wrote them, thread after thread (so lines of different threads
/// may be out of order by up to an interval). Shards of threads that have ended are dropped
/// once emptied.
fn drain(out: &mut dyn Write) {
    let sink = sink();
    let shards = lock(&sink.shards).clone();
    for shard in &shards {
        take_and_write(shard, out);
    }
    drop(shards);
    // The list holds one reference; a second is its thread's, while that thread lives.
    lock(&sink.shards).retain(|s| Arc::strong_count(s) > 1 || !lock(s).lines.is_empty());
}

/// Writes a shard's records to `out` (the caller holds the order lock); the thread goes on in
/// the spare buffer meanwhile, and the written one becomes the spare.
fn take_and_write(shard: &Shard, out: &mut dyn Write) {
    let mut batch = {
        let mut b = lock(shard);
        if b.lines.is_empty() {
            return;
        }
        let spare = std::mem::take(&mut b.spare);
        std::mem::replace(&mut b.lines, spare)
    };
    let _ = out.write_all(&batch);
    if batch.capacity() <= KEEP {
        batch.clear();
        let mut b = lock(shard);
        if b.spare.capacity() == 0 {
            b.spare = batch;
        }
    }
}

/// Appends a finished line (or several) to this thread's batch; a full batch is written now.
fn append(data: &[u8]) {
    let appended = SHARD.try_with(|cell| {
        let shard = cell.get_or_init(|| {
            let shard = Shard::default();
            lock(&sink().shards).push(Arc::clone(&shard));
            shard
        });
        let full = {
            let mut b = lock(shard);
            if b.lines.capacity() == 0 {
                // Room for a full batch and the line that fills it, grown once.
                b.lines.reserve(HIGH_WATER + 16 * 1024);
            }
            b.lines.extend_from_slice(data);
            b.lines.len() >= HIGH_WATER
        };
        if full {
            with_output(|out| take_and_write(shard, out));
        }
    });
    if appended.is_err() {
        // A thread's last words, logged while its thread-locals are torn down: straight out.
        with_output(|out| {
            let _ = out.write_all(data);
        });
    }
}

/// The writer `env_logger` is given: appends to this thread's batch.
struct Batched;

impl Write for Batched {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        append(data);
        Ok(data.len())
    }

    /// `env_logger` flushes after every record; the batch is written on the interval instead.
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A thread's line under construction and the timestamp prefix of its current second.
struct Scratch {
    line: Vec<u8>,
    /// The monotonic instant the prefix's second ends at; `None` before the first line.
    second_ends: Option<Instant>,
    prefix: Vec<u8>,
}

impl Scratch {
    /// Makes `prefix` name the wall-clock second of `at`: kept while `at` is before the end of
    /// the second it names, else rebuilt from `read()`, the monotonic and the wall clock read
    /// together.
    fn stamp(&mut self, at: Instant, read: impl FnOnce() -> (Instant, SystemTime)) {
        if self.second_ends.is_some_and(|end| at < end) {
            return;
        }
        let (mono, wall) = read();
        let into_second = wall.duration_since(UNIX_EPOCH).map_or(Duration::ZERO, |d| {
            Duration::from_nanos(d.subsec_nanos().into())
        });
        // The wall clock's second ends this long after the monotonic clock's `mono`.
        self.second_ends = Some(mono + (Duration::from_secs(1) - into_second));
        self.prefix.clear();
        let stamp = jiff::Timestamp::try_from(wall).unwrap_or(jiff::Timestamp::UNIX_EPOCH);
        let _ = write!(self.prefix, "[{stamp:.0} INFO  {ACCESS_TARGET}] ");
    }
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = const {
        RefCell::new(Scratch { line: Vec::new(), second_ends: None, prefix: Vec::new() })
    };
}

/// The time a log line is stamped with. Log timestamps are the one use of the wall clock that
/// no decision depends on (`env_logger` reads it the same way), so no injected clock here.
#[allow(clippy::disallowed_methods)]
fn wall_clock() -> SystemTime {
    SystemTime::now()
}

/// Writes one access-log line at `info` whose message `message` writes (a JSON object, no
/// newline), if the filter lets `sluice::access` through. The line is what `env_logger` would
/// have written: `[2026-01-02T03:04:05Z INFO  sluice::access] {...}`.
///
/// `at` is the caller's monotonic clock read for the moment the line records (a request's
/// end). The wall clock is read once a second per thread, when `at` passes the end of the
/// second the prefix names, rather than once a line: the stamp is whole seconds, and a clock
/// read is ~26-35 ns on this VM (callgrind cannot see that; it counts ~50 instructions).
pub fn access_line(at: Instant, message: impl FnOnce(&mut Vec<u8>)) {
    if !log::log_enabled!(target: ACCESS_TARGET, log::Level::Info) {
        return;
    }
    if !BATCHED.load(Ordering::Relaxed) {
        let mut line = Vec::new();
        message(&mut line);
        log::info!(target: ACCESS_TARGET, "{}", String::from_utf8_lossy(&line));
        return;
    }
    SCRATCH.with(|scratch| {
        let Ok(mut scratch) = scratch.try_borrow_mut() else {
            return; // only if `message` itself logged an access line: not done
        };
        scratch.stamp(at, || (Instant::now(), wall_clock()));
        let Scratch { line, prefix, .. } = &mut *scratch;
        line.clear();
        line.extend_from_slice(prefix);
        message(line);
        line.push(b'\n');
        append(line);
        // A rare huge line (a long deployment list) does not stay allocated per thread.
        if line.capacity() > 16 * 1024 {
            *line = Vec::new();
        }
    });
}

/// Installs `env_logger` (filter from `RUST_LOG`, else `default_filter`) writing in batches,
/// and starts the thread that writes them.
pub fn init(default_filter: &str) {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default_filter))
        .target(env_logger::Target::Pipe(Box::new(Batched)))
        .init();
    BATCHED.store(true, Ordering::Relaxed);
    let started = std::thread::Builder::new()
        .name("sluice-log".to_owned())
        .spawn(|| loop {
            std::thread::sleep(INTERVAL);
            flush();
        });
    if let Err(e) = started {
        eprintln!("sluice: no log thread ({e}); logs are written when the buffer fills");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the log would have written to stderr.
    pub(super) static OUTPUT: Mutex<Vec<u8>> = Mutex::new(Vec::new());

    /// Runs the tests of this module one at a time (they share the sink and [`OUTPUT`]).
    static SERIAL: Mutex<()> = Mutex::new(());

    /// Everything written so far, taken out.
    fn written() -> String {
        String::from_utf8(std::mem::take(&mut *lock(&OUTPUT))).unwrap()
    }

    #[tokio::test]
    async fn the_stamp_names_the_wall_clock_second_and_reads_the_clock_once_a_second() {
        let mut scratch = Scratch {
            line: Vec::new(),
            second_ends: None,
            prefix: Vec::new(),
        };
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let wall = |ms: u64| UNIX_EPOCH + Duration::from_millis(ms);
        let prefix = |s: &Scratch| String::from_utf8(s.prefix.clone()).unwrap();
        // First line: the clock is read; 1000.25 s into the epoch, 0.75 s of the second left.
        scratch.stamp(at(0), || (at(0), wall(1_000_250)));
        assert_eq!(
            prefix(&scratch),
            "[1970-01-01T00:16:40Z INFO  sluice::access] "
        );
        // Within that second: no clock read.
        scratch.stamp(at(749), || panic!("read the clock within the second"));
        assert_eq!(
            prefix(&scratch),
            "[1970-01-01T00:16:40Z INFO  sluice::access] "
        );
        // At its end: read again, the next second.
        let mut read = false;
        scratch.stamp(at(750), || {
            read = true;
            (at(750), wall(1_001_000))
        });
        assert!(read, "the clock is read once the second is over");
        assert_eq!(
            prefix(&scratch),
            "[1970-01-01T00:16:41Z INFO  sluice::access] "
        );
        // A wall clock stepped back (NTP) is followed at the next second's end.
        scratch.stamp(at(1_750), || (at(1_750), wall(990_500)));
        assert_eq!(
            prefix(&scratch),
            "[1970-01-01T00:16:30Z INFO  sluice::access] "
        );
        scratch.stamp(at(2_249), || panic!("read the clock within the second"));
    }

    #[test]
    fn threads_past_the_high_water_mark_and_the_flusher_never_block_each_other() {
        let _serial = lock(&SERIAL);
        flush();
        written();
        // Four threads write 16 batches' worth each (so each writes its own batch, past
        // HIGH_WATER, again and again) while a fifth flushes as fast as it can: with the two
        // locks taken in opposite orders, this deadlocked.
        let stop = Arc::new(AtomicBool::new(false));
        let flusher = {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    flush();
                }
            })
        };
        let line = |t: usize, i: usize| format!("t{t} {i:06} {}\n", "x".repeat(1000));
        let writers: Vec<_> = (0..4)
            .map(|t| {
                std::thread::spawn(move || {
                    for i in 0..16 * HIGH_WATER / 1000 {
                        append(line(t, i).as_bytes());
                    }
                })
            })
            .collect();
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for w in writers {
                w.join().unwrap();
            }
            stop.store(true, Ordering::Relaxed);
            flusher.join().unwrap();
            let _ = done.send(());
        });
        assert!(
            finished.recv_timeout(Duration::from_secs(60)).is_ok(),
            "writers and flusher deadlocked"
        );
        flush();
        let text = written();
        for t in 0..4 {
            let prefix = format!("t{t} ");
            let mine: Vec<&str> = text.lines().filter(|l| l.starts_with(&prefix)).collect();
            assert_eq!(
                mine.len(),
                16 * HIGH_WATER / 1000,
                "thread {t}: every line out"
            );
            for (i, l) in mine.iter().enumerate() {
                assert_eq!(
                    format!("{l}\n"),
                    line(t, i),
                    "thread {t}: line {i} whole, in order"
                );
            }
        }
    }

    #[test]
    fn every_threads_lines_come_out_whole_in_their_order_and_ended_threads_are_let_go() {
        let _serial = lock(&SERIAL);
        flush();
        written();
        let threads: Vec<_> = (0..4)
            .map(|t| {
                std::thread::spawn(move || {
                    for i in 0..1000 {
                        append(format!("t{t} line {i}\n").as_bytes());
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        // Past HIGH_WATER a thread writes its own batch to stderr: these stay below it.
        let mut out = Vec::new();
        drain(&mut out);
        let text = String::from_utf8(out).unwrap();
        for t in 0..4 {
            let mine: Vec<&str> = text
                .lines()
                .filter(|l| l.starts_with(&format!("t{t} ")))
                .collect();
            let expected: Vec<String> = (0..1000).map(|i| format!("t{t} line {i}")).collect();
            assert_eq!(mine, expected, "thread {t}");
        }
        // The four threads have ended and their shards were emptied: none is kept.
        let ours = lock(&sink().shards).len();
        assert_eq!(ours, 0, "shards of ended threads are dropped");

        // A live thread's shard stays registered, empty or not.
        append(b"main\n");
        let mut out = Vec::new();
        drain(&mut out);
        assert_eq!(out, b"main\n");
        let shards = lock(&sink().shards).clone();
        assert_eq!(shards.len(), 1);
        // The written buffer is kept for the next batch, no new one grown.
        let spare = lock(&shards[0]).spare.capacity();
        assert!(spare >= HIGH_WATER, "spare buffer of {spare} bytes");
        append(b"again\n");
        let mut out = Vec::new();
        drain(&mut out);
        assert_eq!(out, b"again\n");
        assert_eq!(
            lock(&shards[0]).spare.capacity(),
            spare,
            "the two buffers alternate"
        );
    }
}
