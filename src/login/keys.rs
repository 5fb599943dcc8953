//! Text key=value parsing and formatting (RFC 7143 §6.1, §5.1).
//!
//! A data segment is a sequence of `key=value` pairs, each terminated by a NUL byte. Values
//! are strings, lists (comma-separated), numbers (decimal, `0x` hex or `0b` base64), ranges
//! (`a~b`), booleans (`Yes`/`No`) or the special answers `NotUnderstood`, `Irrelevant`, `Reject`.

use super::LoginError;

/// §6.1: "A key-name MUST NOT exceed 63 bytes".
pub const MAX_KEY_LEN: usize = 63;
/// Upper bound for any value string we accept. Most values are limited to 255 bytes (§6.1),
/// but large binary values (CHAP_C/CHAP_R, up to 1024 bytes as hex or base64) and lists need
/// more; those per-key limits are enforced by the negotiation.
pub const MAX_VALUE_LEN: usize = 8192;
/// §6.1: the default limit of an individual value.
pub const MAX_SHORT_VALUE_LEN: usize = 255;
/// At most this many pairs in one (possibly multi-PDU) text exchange; a real initiator sends
/// a few dozen.
pub const MAX_KEYS: usize = 256;

pub const NOT_UNDERSTOOD: &str = "NotUnderstood";
pub const IRRELEVANT: &str = "Irrelevant";
pub const REJECT: &str = "Reject";

/// One `key=value` pair, in the order it was received.
pub type Pair = (String, String);

/// Parses a whole (reassembled) data segment into ordered pairs.
///
/// Accepts a final pair without its NUL terminator (some initiators omit it) and skips empty
/// strings between NULs (padding). Rejects pairs without `=`, empty or over-long key names,
/// over-long values, non-UTF-8 text and more than [`MAX_KEYS`] pairs.
pub fn parse(data: &[u8]) -> Result<Vec<Pair>, LoginError> {
    let mut out = Vec::new();
    for raw in data.split(|b| *b == 0) {
        if raw.is_empty() {
            continue;
        }
        if out.len() >= MAX_KEYS {
            return Err(LoginError::Malformed(format!("more than {MAX_KEYS} keys")));
        }
        let text = std::str::from_utf8(raw)
            .map_err(|_| LoginError::Malformed("key=value pair is not UTF-8".into()))?;
        let (key, value) = text
            .split_once('=')
            .ok_or_else(|| LoginError::Malformed("key without '='".into()))?;
        if key.is_empty() {
            return Err(LoginError::Malformed("empty key name".into()));
        }
        if key.len() > MAX_KEY_LEN {
            return Err(LoginError::Malformed(
                "key name longer than 63 bytes".into(),
            ));
        }
        // §6.1: key names are letters, digits, '.', '-', '+', '@', '_' (and ':' for X#).
        if !key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-+@_:#".contains(&b))
        {
            return Err(LoginError::Malformed(
                "invalid character in key name".into(),
            ));
        }
        if value.len() > MAX_VALUE_LEN {
            return Err(LoginError::Malformed(format!("value of {key} too long")));
        }
        out.push((key.to_string(), value.to_string()));
    }
    Ok(out)
}

/// Formats pairs back into a NUL-terminated data segment.
pub fn format(pairs: &[Pair]) -> Vec<u8> {
    let mut out = Vec::with_capacity(pairs.iter().map(|(k, v)| k.len() + v.len() + 2).sum());
    for (k, v) in pairs {
        out.extend_from_slice(k.as_bytes());
        out.push(b'=');
        out.extend_from_slice(v.as_bytes());
        out.push(0);
    }
    out
}

/// Splits a list value (§6.1 list-of-values) into its items.
pub fn list(value: &str) -> impl Iterator<Item = &str> {
    value.split(',')
}

/// Parses a boolean (§6.1: `Yes` or `No`, case-sensitive).
pub fn boolean(value: &str) -> Option<bool> {
    match value {
        "Yes" => Some(true),
        "No" => Some(false),
        _ => None,
    }
}

pub fn yes_no(b: bool) -> &'static str {
    if b {
        "Yes"
    } else {
        "No"
    }
}

/// Parses a numerical value (§6.1 decimal-constant, hex-constant or base64-constant) of at
/// most 64 bits.
pub fn number(value: &str) -> Option<u64> {
    if value.len() > 2 && (value.starts_with("0x") || value.starts_with("0X")) {
        let digits = value.get(2..)?;
        if digits.len() > 16 {
            return None;
        }
        return u64::from_str_radix(digits, 16).ok();
    }
    if value.len() > 2 && (value.starts_with("0b") || value.starts_with("0B")) {
        let bytes = base64_decode(value.get(2..)?)?;
        if bytes.is_empty() || bytes.len() > 8 {
            return None;
        }
        return Some(bytes.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b)));
    }
    // decimal-constant: digits only, no sign, no leading '+'.
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value.parse().ok()
}

/// Parses a numerical range `a~b` (§6.1 numeric-range) with `a <= b`.
pub fn range(value: &str) -> Option<(u64, u64)> {
    let (a, b) = value.split_once('~')?;
    let (a, b) = (number(a)?, number(b)?);
    (a <= b).then_some((a, b))
}

/// Decodes a binary value (§6.1 hex-constant `0x..` or base64-constant `0b..`), as CHAP_C and
/// CHAP_R use. An odd number of hex digits has an implied leading zero.
pub fn binary(value: &str) -> Option<Vec<u8>> {
    let prefix = value.get(..2)?;
    let body = value.get(2..)?;
    match prefix {
        "0x" | "0X" => hex_decode(body),
        "0b" | "0B" => base64_decode(body),
        _ => None,
    }
}

/// Formats bytes as a `0x` hex-constant.
pub fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(2 + bytes.len() * 2);
    s.push_str("0x");
    for b in bytes {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

fn hex_decode(body: &str) -> Option<Vec<u8>> {
    if body.is_empty() {
        return None;
    }
    let digits: Vec<u8> = body
        .bytes()
        .map(|c| (c as char).to_digit(16).map(|d| d as u8))
        .collect::<Option<_>>()?;
    let mut out = Vec::with_capacity(digits.len() / 2 + 1);
    let mut rest = digits.as_slice();
    if rest.len() % 2 == 1 {
        out.push(*rest.first()?);
        rest = rest.get(1..)?;
    }
    for pair in rest.chunks_exact(2) {
        out.push((pair[0] << 4) | pair[1]);
    }
    Some(out)
}

/// Standard base64 (RFC 4648) with optional '=' padding.
fn base64_decode(body: &str) -> Option<Vec<u8>> {
    fn val(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    }
    let trimmed = body.trim_end_matches('=');
    if trimmed.is_empty() || body.len() - trimmed.len() > 2 || trimmed.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(trimmed.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0u32;
    for c in trimmed.bytes() {
        acc = (acc << 6) | val(c)?;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pairs_in_order() {
        let p = parse(b"InitiatorName=iqn.x\0SessionType=Normal\0").unwrap();
        assert_eq!(
            p,
            vec![
                ("InitiatorName".into(), "iqn.x".into()),
                ("SessionType".into(), "Normal".into())
            ]
        );
    }

    #[test]
    fn tolerates_missing_final_nul_and_padding() {
        let p = parse(b"A=1\0\0\0B=2").unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(p[1], ("B".into(), "2".into()));
        assert!(parse(b"").unwrap().is_empty());
    }

    #[test]
    fn value_may_contain_equals_and_be_empty() {
        let p = parse(b"SendTargets=\0X-a=b=c\0").unwrap();
        assert_eq!(p[0].1, "");
        assert_eq!(p[1].1, "b=c");
    }

    #[test]
    fn rejects_malformed() {
        assert!(matches!(
            parse(b"NoEquals\0"),
            Err(LoginError::Malformed(_))
        ));
        assert!(matches!(parse(b"=v\0"), Err(LoginError::Malformed(_))));
        assert!(matches!(
            parse(b"K=\xff\xfe\0"),
            Err(LoginError::Malformed(_))
        ));
        assert!(matches!(parse(b"K y=v\0"), Err(LoginError::Malformed(_))));
        let long_key = format!("{}=v\0", "K".repeat(64));
        assert!(parse(long_key.as_bytes()).is_err());
        let ok_key = format!("{}=v\0", "K".repeat(63));
        assert!(parse(ok_key.as_bytes()).is_ok());
        let long_val = format!("K={}\0", "v".repeat(MAX_VALUE_LEN + 1));
        assert!(parse(long_val.as_bytes()).is_err());
        let many: String = (0..=MAX_KEYS).map(|i| format!("K{i}=1\0")).collect();
        assert!(parse(many.as_bytes()).is_err());
    }

    #[test]
    fn format_roundtrip() {
        let pairs = vec![("A".to_string(), "1".to_string()), ("B".into(), "".into())];
        assert_eq!(format(&pairs), b"A=1\0B=\0");
        assert_eq!(parse(&format(&pairs)).unwrap(), pairs);
    }

    #[test]
    fn numbers() {
        assert_eq!(number("8192"), Some(8192));
        assert_eq!(number("0x2000"), Some(8192));
        assert_eq!(number("0bIAA="), Some(0x2000));
        assert_eq!(number("-1"), None);
        assert_eq!(number("+1"), None);
        assert_eq!(number(""), None);
        assert_eq!(number("12a"), None);
        assert_eq!(number("99999999999999999999999"), None);
        assert_eq!(number("0x"), None);
    }

    #[test]
    fn ranges_lists_booleans() {
        assert_eq!(range("1~5"), Some((1, 5)));
        assert_eq!(range("5~1"), None);
        assert_eq!(range("5"), None);
        assert_eq!(list("CRC32C,None").collect::<Vec<_>>(), ["CRC32C", "None"]);
        assert_eq!(boolean("Yes"), Some(true));
        assert_eq!(boolean("No"), Some(false));
        assert_eq!(boolean("yes"), None);
        assert_eq!(yes_no(true), "Yes");
    }

    #[test]
    fn binary_values() {
        assert_eq!(binary("0x0102ff"), Some(vec![1, 2, 0xff]));
        assert_eq!(binary("0X102"), Some(vec![1, 2]));
        assert_eq!(binary("0bAQL/"), Some(vec![1, 2, 0xff]));
        assert_eq!(binary("0bAQI="), Some(vec![1, 2]));
        assert_eq!(binary("0bAQ=="), Some(vec![1]));
        assert_eq!(binary("0x"), None);
        assert_eq!(binary("0xzz"), None);
        assert_eq!(binary("0b!!"), None);
        assert_eq!(binary("1234"), None);
        assert_eq!(hex(&[0, 0xab]), "0x00ab");
        assert_eq!(binary(&hex(&[9, 8, 7])), Some(vec![9, 8, 7]));
    }
}
