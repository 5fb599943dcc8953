//! Text key=value parsing and formatting (RFC 7143 §6.1, §5.1).
//! To be implemented: parse a NUL-separated data segment into ordered (key, value) pairs with
//! limits on count and length; value helpers for lists, numbers, ranges and booleans.
