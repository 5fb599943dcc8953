//! A TCP proxy that can stall: bytes flow both ways until the test calls `stall(true)`, then
//! nothing more is forwarded (connections stay open, silent: the peer sees a slow server, not
//! a refused one) until `stall(false)`. For etcd, whose gRPC runs over long-lived HTTP/2
//! connections. Include it with `#[path = "common/stallproxy.rs"] mod stallproxy;`.

#![allow(dead_code)] // each test uses a different subset

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;

/// A running proxy on 127.0.0.1 (it serves until the test process ends).
pub struct StallProxy {
    pub port: u16,
    stalled: Arc<(Mutex<bool>, Condvar)>,
}

impl StallProxy {
    /// Proxy to `upstream` (`HOST:PORT`).
    pub fn start(upstream: &str) -> StallProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the stall proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let stalled = Arc::new((Mutex::new(false), Condvar::new()));
        let (up, st) = (upstream.to_string(), stalled.clone());
        thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let Ok(server) = TcpStream::connect(&up) else {
                    continue;
                };
                for (from, to) in [(&conn, &server), (&server, &conn)] {
                    let (Ok(from), Ok(to)) = (from.try_clone(), to.try_clone()) else {
                        continue;
                    };
                    let st = st.clone();
                    thread::spawn(move || pump(from, to, &st));
                }
            }
        });
        StallProxy { port, stalled }
    }

    /// Stop (true) or resume (false) forwarding, on every connection at once.
    pub fn stall(&self, on: bool) {
        let (m, cv) = &*self.stalled;
        *m.lock().unwrap_or_else(|p| p.into_inner()) = on;
        cv.notify_all();
    }
}

/// Copy `from` to `to`; each chunk read waits, before it is written, while the proxy stalls.
fn pump(mut from: TcpStream, mut to: TcpStream, stalled: &(Mutex<bool>, Condvar)) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let (m, cv) = stalled;
        let mut s = m.lock().unwrap_or_else(|p| p.into_inner());
        while *s {
            s = cv.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        drop(s);
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}
