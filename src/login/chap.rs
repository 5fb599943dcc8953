//! CHAP (RFC 1994, RFC 7143 §12.1.3) with MD5. To be implemented.
