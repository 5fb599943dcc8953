//! diskless: an iSCSI target for network boot.
//!
//! Imports go one way, bottom-up (see docs/architecture.md):
//! - [`config`]: targets.yaml as plain data (imports nothing of the crate).
//! - [`pdu`], [`login`], [`scsi`], [`storage`], [`identity`]: the PDU codec, text keys and
//!   login/CHAP (pure state machines), the SCSI block command set, block stores, LUN identity.
//! - [`boot`]: boot emulation: bindings, per-client disks over overlays, the client lifecycle
//!   ([`boot::lifecycle`], pure), the boot script endpoint.
//! - [`cluster`]: several nodes placed through etcd (a pure placement core and an etcd
//!   shell; imports only `config`).
//! - [`registry`]: the targets built from the configuration (uses `boot`, never the reverse).
//! - [`session`]: sessions and connections on tokio (the only layer that touches sockets);
//!   turns `config::SettingsConfig` into its runtime settings.
//! - [`netboot`]: proxyDHCP/DHCP and TFTP (pure cores, a tokio UDP shell), the file root the
//!   boot HTTP endpoint also serves (imports only `config`).
//! - [`control`], [`cli`]: the operator socket and the command line.

pub mod api;
pub mod boot;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod control;
pub mod identity;
pub mod login;
pub mod metrics;
pub mod netboot;
pub mod pdu;
pub mod registry;
pub mod scsi;
pub mod session;
pub mod storage;
