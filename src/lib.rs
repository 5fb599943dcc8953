//! diskless: an iSCSI target for network boot.
//!
//! Layers, bottom-up (see docs/architecture.md):
//! - [`pdu`]: the PDU codec (pure: bytes in, values out).
//! - [`login`]: text keys, login and text negotiation, CHAP (pure state machines).
//! - [`session`]: sessions and connections on tokio (the only layer that touches sockets).
//! - [`scsi`]: the SCSI block command set, knows nothing of iSCSI.
//! - [`storage`]: block stores (image files, memory).
//! - [`config`] and [`registry`]: targets.yaml and the targets built from it.
//! - [`boot`]: boot emulation: bindings, per-client disks over overlays, the boot script
//!   endpoint.
//! - [`netboot`]: proxyDHCP/DHCP and TFTP (pure cores, a tokio UDP shell), the file root the
//!   boot HTTP endpoint also serves.
//! - [`cli`]: the command line.

pub mod boot;
pub mod cli;
pub mod config;
pub mod control;
pub mod login;
pub mod netboot;
pub mod pdu;
pub mod registry;
pub mod scsi;
pub mod session;
pub mod storage;
