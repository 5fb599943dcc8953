//! A tiny fault-injecting HTTP/1.1 proxy for the S3 tests: it sits between diskless and the
//! RADOS gateway and, for requests whose path contains a given part (e.g. `/chunks/`), answers
//! `503 Slow Down` or waits before forwarding, as the test says. Requests are forwarded byte
//! for byte (the SigV4 signature covers the Host header, which is kept: the client signed the
//! proxy's address), one request per connection (`Connection: close` both ways). Include it
//! with `#[path = "common/faultproxy.rs"] mod faultproxy;`.

#![allow(dead_code)] // each test uses a different subset

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What the proxy does to the matching requests.
#[derive(Debug, Default, Clone)]
pub struct Faults {
    /// Answer the next N matching requests with 503 (then forward again).
    pub fail_next: usize,
    /// Answer every matching request with 503.
    pub fail_all: bool,
    /// Wait this long before forwarding the next N matching requests…
    pub delay_next: usize,
    /// …or every matching request.
    pub delay_all: bool,
    pub delay: Duration,
}

/// What the proxy saw.
#[derive(Debug, Default, Clone)]
pub struct Seen {
    pub requests: usize,
    pub matching: usize,
    pub failed: usize,
    pub delayed: usize,
}

struct State {
    faults: Faults,
    seen: Seen,
}

/// A running proxy on 127.0.0.1; it stops accepting when dropped.
pub struct FaultProxy {
    pub port: u16,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
}

impl FaultProxy {
    /// Proxy to `upstream` (`127.0.0.1:PORT`); faults apply to paths containing `part`.
    pub fn start(upstream: &str, part: &str) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let state = Arc::new(Mutex::new(State {
            faults: Faults::default(),
            seen: Seen::default(),
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp, up, part) = (
            state.clone(),
            stop.clone(),
            upstream.to_string(),
            part.to_string(),
        );
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if sp.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let (st, up, part) = (st.clone(), up.clone(), part.clone());
                std::thread::spawn(move || {
                    let _ = serve(conn, &up, &part, &st);
                });
            }
        });
        FaultProxy { port, state, stop }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Replace the faults.
    pub fn set(&self, faults: Faults) {
        self.state.lock().expect("proxy state").faults = faults;
    }

    pub fn seen(&self) -> Seen {
        self.state.lock().expect("proxy state").seen.clone()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so that it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

enum Action {
    Forward,
    Fail,
    Delay(Duration),
}

fn serve(client: TcpStream, upstream: &str, part: &str, st: &Mutex<State>) -> std::io::Result<()> {
    client.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut reader = BufReader::new(client.try_clone()?);
    // The request head, line by line; `Connection:` is replaced by `Connection: close`.
    let mut head = Vec::new();
    let mut request_line = String::new();
    let mut length = 0usize;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        if request_line.is_empty() {
            request_line = line.clone();
        }
        let lower = line.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("content-length:") {
            length = v.trim().parse().unwrap_or(0);
        }
        if line == "\r\n" {
            head.extend_from_slice(b"Connection: close\r\n\r\n");
            break;
        }
        if !lower.starts_with("connection:") {
            head.extend_from_slice(line.as_bytes());
        }
    }
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body)?;
    let path = request_line.split_whitespace().nth(1).unwrap_or("");
    let action = {
        let mut s = st.lock().expect("proxy state");
        s.seen.requests += 1;
        if path.contains(part) {
            s.seen.matching += 1;
            let f = &mut s.faults;
            let a = if f.fail_all || f.fail_next > 0 {
                f.fail_next = f.fail_next.saturating_sub(1);
                Action::Fail
            } else if f.delay_all || f.delay_next > 0 {
                f.delay_next = f.delay_next.saturating_sub(1);
                Action::Delay(f.delay)
            } else {
                Action::Forward
            };
            match a {
                Action::Fail => s.seen.failed += 1,
                Action::Delay(_) => s.seen.delayed += 1,
                Action::Forward => {}
            }
            a
        } else {
            Action::Forward
        }
    };
    let mut client = client;
    match action {
        Action::Fail => {
            let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>SlowDown</Code>\
                        <Message>injected by the test's proxy</Message></Error>";
            write!(
                client,
                "HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )?;
            return client.flush();
        }
        Action::Delay(d) => std::thread::sleep(d),
        Action::Forward => {}
    }
    let mut up = TcpStream::connect(upstream)?;
    up.write_all(&head)?;
    up.write_all(&body)?;
    // The answer's head with `Connection: close` (so the client never reuses this
    // connection), then the rest as it comes (upstream closes after it).
    let mut up = BufReader::new(up);
    loop {
        let mut line = String::new();
        if up.read_line(&mut line)? == 0 {
            return Ok(());
        }
        if line == "\r\n" {
            client.write_all(b"Connection: close\r\n\r\n")?;
            break;
        }
        if !line.to_ascii_lowercase().starts_with("connection:") {
            client.write_all(line.as_bytes())?;
        }
    }
    let _ = std::io::copy(&mut up, &mut client);
    client.flush()
}
