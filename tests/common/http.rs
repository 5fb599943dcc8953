//! A minimal HTTP/1.1 client for the operator API tests (std only: one request per
//! connection, `Connection: close`), plus a Server-Sent Events reader.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// A parsed response.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    /// The body as JSON (panics with the body if it is not).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {} {}", self.status, self.body))
    }
}

/// `http://127.0.0.1:PORT/` -> "127.0.0.1:PORT".
pub fn authority(base: &str) -> String {
    base.trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string()
}

/// One request. `headers` are added as given (a test sets Host, Origin, Content-Type...);
/// Host defaults to the address.
pub fn request(
    base: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> Response {
    let addr = authority(base);
    let mut s = TcpStream::connect(&addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\n");
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        req.push_str(&format!("Host: {addr}\r\n"));
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    let body = body.unwrap_or("");
    if method != "GET" {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    parse(&raw)
}

fn parse(raw: &[u8]) -> Response {
    let text = String::from_utf8_lossy(raw).into_owned();
    let (head, rest) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP header end in {text:?}"));
    let mut lines = head.lines();
    let status: u16 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad status line in {head:?}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    let body = if chunked {
        dechunk(rest)
    } else {
        rest.to_string()
    };
    Response {
        status,
        headers,
        body,
    }
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// A client holding the bearer token (None: no credential).
#[derive(Clone)]
pub struct Api {
    pub base: String,
    pub token: Option<String>,
}

impl Api {
    fn auth(&self) -> Vec<(&str, String)> {
        self.token
            .iter()
            .map(|t| ("Authorization", format!("Bearer {t}")))
            .collect()
    }
    pub fn get(&self, path: &str) -> Response {
        let a = self.auth();
        let h: Vec<(&str, &str)> = a.iter().map(|(k, v)| (*k, v.as_str())).collect();
        request(&self.base, "GET", path, &h, None)
    }
    /// GET that must answer 200 with JSON.
    pub fn get_json(&self, path: &str) -> serde_json::Value {
        let r = self.get(path);
        assert_eq!(r.status, 200, "GET {path}: {r:?}");
        r.json()
    }
    /// POST with a JSON body and the content type an action needs.
    pub fn post(&self, path: &str, body: &str) -> Response {
        let a = self.auth();
        let mut h: Vec<(&str, &str)> = a.iter().map(|(k, v)| (*k, v.as_str())).collect();
        h.push(("Content-Type", "application/json"));
        request(&self.base, "POST", path, &h, Some(body))
    }
    /// DELETE with the content type an action needs (and an empty body).
    pub fn delete(&self, path: &str) -> Response {
        let a = self.auth();
        let mut h: Vec<(&str, &str)> = a.iter().map(|(k, v)| (*k, v.as_str())).collect();
        h.push(("Content-Type", "application/json"));
        request(&self.base, "DELETE", path, &h, Some(""))
    }
    /// POST with extra headers (cross-site tests).
    pub fn post_with(&self, path: &str, extra: &[(&str, &str)], body: &str) -> Response {
        let a = self.auth();
        let mut h: Vec<(&str, &str)> = a.iter().map(|(k, v)| (*k, v.as_str())).collect();
        h.extend_from_slice(extra);
        request(&self.base, "POST", path, &h, Some(body))
    }
}

/// `iqn.x:y` as a path segment.
pub fn seg(s: &str) -> String {
    s.replace(':', "%3A")
}

/// Poll `f` until it returns Some, for at most `limit` (a condition, never a fixed sleep).
pub fn wait_for<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// An open event stream; `next` returns (event, data) pairs.
pub struct Sse {
    reader: BufReader<TcpStream>,
}

impl Sse {
    pub fn open(api: &Api) -> Sse {
        let addr = authority(&api.base);
        let mut s = TcpStream::connect(&addr).unwrap();
        let mut req = format!("GET /api/v1/events HTTP/1.1\r\nHost: {addr}\r\n");
        if let Some(t) = &api.token {
            req.push_str(&format!("Authorization: Bearer {t}\r\n"));
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut reader = BufReader::new(s);
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        assert!(line.contains(" 200 "), "event stream: {line}");
        loop {
            line.clear();
            reader.read_line(&mut line).unwrap();
            if line.trim().is_empty() {
                break;
            }
        }
        Sse { reader }
    }

    /// The next event (chunk-size lines of the chunked encoding are skipped).
    pub fn next(&mut self) -> (String, serde_json::Value) {
        let (mut ev, mut data) = (String::new(), String::new());
        loop {
            let mut line = String::new();
            let n = self.reader.read_line(&mut line).expect("event stream read");
            assert!(n > 0, "event stream closed");
            let l = line.trim_end();
            if let Some(v) = l.strip_prefix("event: ") {
                ev = v.to_string();
            } else if let Some(v) = l.strip_prefix("data: ") {
                data.push_str(v);
            } else if l.is_empty() && !data.is_empty() {
                return (ev, serde_json::from_str(&data).unwrap());
            }
        }
    }

    /// Read events until one of `kind` matching `pred` arrives (bounded by the read timeout
    /// and `limit`).
    pub fn wait(
        &mut self,
        kind: &str,
        limit: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + limit;
        loop {
            assert!(
                Instant::now() < deadline,
                "no {kind} event within {limit:?}"
            );
            let (ev, data) = self.next();
            if ev == kind && pred(&data) {
                return data;
            }
        }
    }
}
