//! The loopback latency floor for scripts/bench.sh: a 48-byte TCP ping-pong (the size of an
//! iSCSI BHS) between two threads over 127.0.0.1, `TCP_NODELAY` on both ends, blocking
//! sockets. It prints the round-trip percentiles in µs, to set beside fio's QD1 4 KiB read
//! p50 (issue 12: within 2x of this).
//!
//! ```text
//! cargo run --release --example pingpong -- [ROUNDS] [WARMUP]
//! p50_us=23.4 p99_us=61.0 mean_us=25.1 rounds=20000
//! ```
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Instant;

const MSG: usize = 48;

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let rounds: usize = args
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_000)
        .max(1);
    let warmup: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(2_000);
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let echo = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = listener.accept()?;
        s.set_nodelay(true)?;
        let mut buf = [0u8; MSG];
        loop {
            match s.read_exact(&mut buf) {
                Ok(()) => s.write_all(&buf)?,
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    });
    let mut c = TcpStream::connect(addr)?;
    c.set_nodelay(true)?;
    let mut buf = [0x5au8; MSG];
    let mut times = Vec::with_capacity(rounds);
    for i in 0..warmup + rounds {
        let t = Instant::now();
        c.write_all(&buf)?;
        c.read_exact(&mut buf)?;
        if i >= warmup {
            times.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    drop(c);
    echo.join()
        .map_err(|_| std::io::Error::other("echo thread panicked"))??;
    times.sort_by(f64::total_cmp);
    let pct = |p: f64| times[((times.len() - 1) as f64 * p).round() as usize];
    let mean = times.iter().sum::<f64>() / times.len().max(1) as f64;
    println!(
        "p50_us={:.1} p99_us={:.1} mean_us={:.1} rounds={}",
        pct(0.5),
        pct(0.99),
        mean,
        times.len()
    );
    Ok(())
}
