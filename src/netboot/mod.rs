//! Built-in network boot (docs/booting.md): proxyDHCP or a small DHCP server ([`dhcp`]), a
//! read-only TFTP server ([`tftp`]) and the file root both share with the boot HTTP endpoint
//! ([`files`]). The protocol cores are pure (bytes and time in, answers out); [`server`] is
//! the tokio shell around them.

pub mod dhcp;
pub mod files;
pub mod server;
pub mod tftp;
