//! proxyDHCP (PXE 2.1) and the optional DHCP server: a pure core. A request's bytes, the port
//! it came in on, its source and the time go in; an answer (bytes and where to send them) or
//! a reason for silence comes out. The codec is `dhcproto`; nothing here touches a socket.
//!
//! Who gets what (the boot file by client, RFC 4578 §2.1 for option 93):
//! - iPXE (user class "iPXE", RFC 3004 option 77, or iPXE's own option 175): the boot-script
//!   URL, so the chain ends at the script.
//! - UEFI HTTP Boot (vendor class "HTTPClient", UEFI 2.5+ §24.7): an http:// URL of the iPXE
//!   binary for its architecture, and "HTTPClient" echoed in option 60.
//! - PXE firmware (vendor class "PXEClient"): the iPXE binary's name for TFTP, siaddr = us.
//! - anything else: no boot information (proxy mode: silence).
//!
//! proxyDHCP never offers an address (yiaddr 0), answers DISCOVERs on port 67 and
//! REQUESTs/INFORMs on port 4011 (PXE 2.1 §2.2.4, §2.2.6); the site's DHCP server does the rest.

use crate::config::{BootFilesConfig, NetbootMode, PoolConfig};
use dhcproto::v4::{
    Architecture, DhcpOption, Flags, HType, Message, MessageType, Opcode, OptionCode, UnknownOption,
};
use dhcproto::{Decodable, Decoder, Encodable, Encoder};
use std::collections::{BTreeMap, HashSet};
use std::net::{Ipv4Addr, SocketAddrV4};

/// Largest DHCP datagram we read: RFC 2131 allows longer ones only when the client
/// announced a larger size (option 57); PXE clients never do this much.
pub const MAX_PACKET: usize = 1500;
/// The fixed BOOTP header plus the magic cookie (RFC 2131 §2, RFC 2132 §2).
pub const MIN_PACKET: usize = 240;
/// An offered (not yet requested) address is held this long (seconds).
pub const OFFER_HOLD_SECS: u64 = 60;

/// Why a packet gets no answer. Every kind is a silence on the wire (RFC 2131 has no error
/// reply to a malformed or foreign message); they differ in how they are logged.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DhcpError {
    /// Not a DHCP message we can decode.
    #[error("malformed: {0}")]
    Malformed(String),
    /// A valid message that is not ours to answer.
    #[error("ignored: {0}")]
    Ignored(&'static str),
    /// The address pool has no free address.
    #[error("address pool exhausted")]
    Exhausted,
}

/// Which listener a packet came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Port {
    /// 67: DHCP (DISCOVER broadcast, and REQUEST in mode dhcp).
    Dhcp,
    /// 4011: PXE boot server / ProxyDHCP REQUEST (unicast).
    Pxe,
}

/// Where an answer goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dest {
    /// 255.255.255.255 to the client port (the client has no address yet).
    Broadcast,
    /// Straight back to this address and port.
    Unicast(SocketAddrV4),
}

/// An answer to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub bytes: Vec<u8>,
    pub to: Dest,
    /// The DHCP message type sent (for logs).
    pub kind: MessageType,
    /// The boot file or URL handed out, if any.
    pub boot: Option<String>,
    /// Leases changed (mode dhcp): persist them.
    pub leases_changed: bool,
}

/// A client firmware's architecture (IANA "Processor Architecture Types", RFC 4578 §2.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Bios,
    UefiIa32,
    UefiX64,
    UefiArm64,
    Other(u16),
}

impl Arch {
    pub fn from_code(code: u16) -> Arch {
        match code {
            0 => Arch::Bios,
            6 | 15 => Arch::UefiIa32,
            // 7 is "EFI BC" in RFC 4578 but x86-64 in practice (IANA errata); 9 is x86-64.
            7 | 9 | 16 => Arch::UefiX64,
            11 | 19 => Arch::UefiArm64,
            n => Arch::Other(n),
        }
    }

    /// "bios" or "uefi": what the boot script is told.
    pub fn firmware(self) -> &'static str {
        match self {
            Arch::Bios => "bios",
            _ => "uefi",
        }
    }
}

/// What kind of client sent the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientKind {
    /// iPXE itself: gets the script URL.
    Ipxe,
    /// UEFI HTTP Boot: gets an http:// URL.
    HttpBoot,
    /// PXE firmware: gets a TFTP file name.
    Pxe,
    /// A plain DHCP client (an OS): no boot information.
    Plain,
}

/// What we learned from a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub msg_type: MessageType,
    pub mac: [u8; 6],
    pub kind: ClientKind,
    pub arch: Arch,
    pub xid: u32,
}

/// The answering policy, resolved from `netboot:` once the listeners are bound.
#[derive(Debug, Clone)]
pub struct Plan {
    pub mode: NetbootMode,
    /// Our address as written into answers (option 54, siaddr, URLs).
    pub server_ip: Ipv4Addr,
    /// Accepted client MACs; None: any.
    pub clients: Option<HashSet<[u8; 6]>>,
    pub boot_files: BootFilesConfig,
    /// The URL handed to iPXE (may hold iPXE `${...}` expansions).
    pub script_url: String,
    /// Base of the HTTP file URLs (`http://IP:PORT/files/`), for UEFI HTTP Boot.
    pub http_files: Option<String>,
    /// TFTP is served (PXE clients can be answered).
    pub tftp: bool,
    pub pool: Option<PoolConfig>,
}

/// Parse a MAC in the config's form (`52:54:00:12:34:56`).
pub fn mac_bytes(mac: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = mac.split([':', '-']);
    for b in out.iter_mut() {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

pub fn mac_string(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Option codes whose length dhcproto only checks with `debug_assert!` or subtracts from
/// unchecked: (code, smallest length, largest length). A packet breaking one of these is
/// refused before it reaches the codec (a debug build would panic, a release build misread).
const LENGTH_RULES: [(u8, usize, usize); 8] = [
    (80, 0, 0),   // Rapid Commit (RFC 4039)
    (81, 3, 255), // Client FQDN (RFC 4702)
    (94, 3, 3),   // Client Network Interface Identifier (RFC 4578 §2.2)
    (151, 1, 255),
    (152, 4, 4),
    (153, 4, 4),
    (154, 4, 4),
    (155, 4, 4),
];

/// Walk the options' TLVs (RFC 2132 §2) only to apply [`LENGTH_RULES`]; decoding is
/// dhcproto's. Like dhcproto, adjacent options with the same code count as one
/// (concatenation, RFC 3396), so the rule applies to their summed length. Options in
/// `file`/`sname` (overload, option 52) are not used, so not checked.
fn precheck(packet: &[u8]) -> Result<(), DhcpError> {
    if packet.len() < MIN_PACKET {
        return Err(DhcpError::Malformed(format!(
            "{} bytes, shorter than the {MIN_PACKET}-byte header",
            packet.len()
        )));
    }
    if packet.len() > MAX_PACKET {
        return Err(DhcpError::Malformed(format!(
            "{} bytes, longer than {MAX_PACKET}",
            packet.len()
        )));
    }
    // dhcproto's chaddr() slices by hlen: more than 16 would panic there.
    if packet[2] > 16 {
        return Err(DhcpError::Malformed(format!("hlen {}", packet[2])));
    }
    if packet[236..240] != [99, 130, 83, 99] {
        return Err(DhcpError::Malformed("no DHCP magic cookie".into()));
    }
    let check = |run: Option<(u8, usize)>| -> Result<(), DhcpError> {
        if let Some((code, len)) = run {
            if let Some(&(_, lo, hi)) = LENGTH_RULES.iter().find(|r| r.0 == code) {
                if len < lo || len > hi {
                    return Err(DhcpError::Malformed(format!(
                        "option {code} has length {len}"
                    )));
                }
            }
        }
        Ok(())
    };
    // The current run of one option code and its total length.
    let mut run: Option<(u8, usize)> = None;
    let mut i = MIN_PACKET;
    while i < packet.len() {
        let code = packet[i];
        match code {
            0 | 255 => {
                check(run.take())?;
                if code == 255 {
                    break;
                }
                i += 1;
            }
            _ => {
                let Some(&len) = packet.get(i + 1) else {
                    return Err(DhcpError::Malformed(format!("option {code} has no length")));
                };
                let len = usize::from(len);
                if i + 2 + len > packet.len() {
                    return Err(DhcpError::Malformed(format!(
                        "option {code} overruns the packet"
                    )));
                }
                run = match run {
                    Some((c, total)) if c == code => Some((c, total + len)),
                    prev => {
                        check(prev)?;
                        Some((code, len))
                    }
                };
                i += 2 + len;
            }
        }
    }
    check(run)
}

/// Decode a packet (bounded, checked, then dhcproto).
pub fn decode(packet: &[u8]) -> Result<Message, DhcpError> {
    precheck(packet)?;
    Message::decode(&mut Decoder::new(packet)).map_err(|e| DhcpError::Malformed(e.to_string()))
}

fn has_ipxe_user_class(data: &[u8]) -> bool {
    // iPXE sends the bare string "iPXE"; RFC 3004 clients length-prefix each class.
    data == b"iPXE" || data.windows(4).any(|w| w == b"iPXE")
}

/// What kind of client, which architecture, which message.
pub fn classify(msg: &Message) -> Result<Request, DhcpError> {
    if msg.opcode() != Opcode::BootRequest {
        return Err(DhcpError::Ignored("not a BOOTREQUEST"));
    }
    if msg.htype() != HType::Eth || msg.hlen() != 6 {
        return Err(DhcpError::Ignored("not an Ethernet client"));
    }
    let msg_type = msg
        .opts()
        .msg_type()
        .ok_or(DhcpError::Ignored("BOOTP without a DHCP message type"))?;
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&msg.chaddr()[..6]);
    let vendor = match msg.opts().get(OptionCode::ClassIdentifier) {
        Some(DhcpOption::ClassIdentifier(v)) => v.as_slice(),
        _ => &[],
    };
    let ipxe = matches!(msg.opts().get(OptionCode::UserClass),
        Some(DhcpOption::UserClass(u)) if has_ipxe_user_class(u))
        || msg.opts().get(OptionCode::Unknown(175)).is_some();
    let kind = if ipxe {
        ClientKind::Ipxe
    } else if vendor.starts_with(b"HTTPClient") {
        ClientKind::HttpBoot
    } else if vendor.starts_with(b"PXEClient") {
        ClientKind::Pxe
    } else {
        ClientKind::Plain
    };
    let arch = match msg.opts().get(OptionCode::ClientSystemArchitecture) {
        Some(DhcpOption::ClientSystemArchitecture(a)) => Arch::from_code(u16::from(*a)),
        // PXE 2.1 also encodes it in the vendor class: "PXEClient:Arch:00007:UNDI:003016".
        _ => std::str::from_utf8(vendor)
            .ok()
            .and_then(|v| v.split(':').skip_while(|p| *p != "Arch").nth(1))
            .and_then(|n| n.parse::<u16>().ok())
            .map_or(Arch::Bios, Arch::from_code),
    };
    Ok(Request {
        msg_type,
        mac,
        kind,
        arch,
        xid: msg.xid(),
    })
}

/// The boot information for a client: (file or URL, vendor class to echo, siaddr).
pub fn boot_choice(plan: &Plan, req: &Request) -> Option<(String, &'static str, Option<Ipv4Addr>)> {
    let file_for = |arch: Arch| -> Option<&str> {
        match arch {
            Arch::Bios => Some(&plan.boot_files.bios),
            Arch::UefiX64 => Some(&plan.boot_files.uefi_x64),
            Arch::UefiIa32 => Some(&plan.boot_files.uefi_ia32),
            Arch::UefiArm64 => Some(&plan.boot_files.uefi_arm64),
            Arch::Other(_) => None,
        }
    };
    match req.kind {
        ClientKind::Ipxe => Some((plan.script_url.clone(), "PXEClient", None)),
        ClientKind::HttpBoot => {
            let base = plan.http_files.as_ref()?;
            let f = file_for(req.arch)?;
            Some((format!("{base}{f}"), "HTTPClient", None))
        }
        ClientKind::Pxe if plan.tftp => {
            let f = file_for(req.arch)?;
            Some((f.to_string(), "PXEClient", Some(plan.server_ip)))
        }
        ClientKind::Pxe | ClientKind::Plain => None,
    }
}

/// One bound or offered address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub ip: Ipv4Addr,
    /// Unix seconds.
    pub expires: u64,
    /// Acknowledged (persisted); false: only offered.
    pub bound: bool,
}

/// The address pool of mode dhcp (RFC 2131 §4.3.1 address choice, simplified: the client's
/// previous address, else the one it asks for, else the lowest free one).
#[derive(Debug, Clone, Default)]
pub struct Leases {
    start: u32,
    end: u32,
    by_mac: BTreeMap<[u8; 6], Lease>,
    /// Addresses a client declined (in use by someone else), until when.
    declined: BTreeMap<u32, u64>,
}

impl Leases {
    pub fn new(start: Ipv4Addr, end: Ipv4Addr) -> Leases {
        Leases {
            start: u32::from(start),
            end: u32::from(end),
            ..Leases::default()
        }
    }

    fn in_pool(&self, ip: Ipv4Addr) -> bool {
        (self.start..=self.end).contains(&u32::from(ip))
    }

    /// Never hand out `ip` (our own address, the router's).
    pub fn reserve(&mut self, ip: Ipv4Addr) {
        self.declined.insert(u32::from(ip), u64::MAX);
    }

    pub fn get(&self, mac: &[u8; 6]) -> Option<Lease> {
        self.by_mac.get(mac).copied()
    }

    fn taken(&self, now: u64, except: &[u8; 6]) -> HashSet<u32> {
        let mut t: HashSet<u32> = self
            .by_mac
            .iter()
            .filter(|(m, l)| *m != except && l.expires > now)
            .map(|(_, l)| u32::from(l.ip))
            .collect();
        t.extend(
            self.declined
                .iter()
                .filter(|(_, &u)| u > now)
                .map(|(ip, _)| *ip),
        );
        t
    }

    /// Choose an address for `mac` and hold it for [`OFFER_HOLD_SECS`].
    pub fn offer(
        &mut self,
        mac: [u8; 6],
        requested: Option<Ipv4Addr>,
        now: u64,
    ) -> Option<Ipv4Addr> {
        let taken = self.taken(now, &mac);
        let free = |ip: Ipv4Addr| self.in_pool(ip) && !taken.contains(&u32::from(ip));
        let ip = match self.by_mac.get(&mac) {
            Some(l) if free(l.ip) => l.ip,
            _ => match requested.filter(|r| free(*r)) {
                Some(r) => r,
                None => Ipv4Addr::from((self.start..=self.end).find(|a| !taken.contains(a))?),
            },
        };
        // One entry per address: an expired lease or offer of another client on this address
        // goes (so a flood of made-up MACs cannot grow the table beyond the pool).
        self.by_mac.retain(|m, l| *m == mac || l.ip != ip);
        let entry = self.by_mac.entry(mac).or_insert(Lease {
            ip,
            expires: 0,
            bound: false,
        });
        if entry.ip != ip || !entry.bound || entry.expires <= now {
            *entry = Lease {
                ip,
                expires: now + OFFER_HOLD_SECS,
                bound: false,
            };
        }
        Some(ip)
    }

    /// Bind `ip` to `mac` (a REQUEST): false if the address is not this client's to have.
    pub fn commit(&mut self, mac: [u8; 6], ip: Ipv4Addr, now: u64, secs: u32) -> bool {
        if !self.in_pool(ip) || self.taken(now, &mac).contains(&u32::from(ip)) {
            return false;
        }
        match self.by_mac.get(&mac) {
            // Only the address we offered or bound to it (another one: it must DISCOVER).
            Some(l) if l.ip == ip => {}
            _ => return false,
        }
        self.by_mac.insert(
            mac,
            Lease {
                ip,
                expires: now + u64::from(secs),
                bound: true,
            },
        );
        true
    }

    pub fn release(&mut self, mac: &[u8; 6]) -> bool {
        self.by_mac.remove(mac).is_some_and(|l| l.bound)
    }

    pub fn decline(&mut self, mac: &[u8; 6], now: u64, secs: u32) -> bool {
        match self.by_mac.remove(mac) {
            Some(l) => {
                self.declined.insert(u32::from(l.ip), now + u64::from(secs));
                l.bound
            }
            None => false,
        }
    }

    /// The bound leases, one per line: `MAC IP EXPIRES` (the state file's format).
    pub fn to_text(&self) -> String {
        let mut s = String::from("# diskless DHCP leases: mac ip expires(unix seconds)\n");
        for (mac, l) in self.by_mac.iter().filter(|(_, l)| l.bound) {
            s.push_str(&format!("{} {} {}\n", mac_string(mac), l.ip, l.expires));
        }
        s
    }

    /// Read leases written by [`Leases::to_text`]; bad lines and addresses outside the pool
    /// are skipped (the pool may have changed).
    pub fn load_text(&mut self, text: &str) -> usize {
        let mut n = 0;
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let mut f = line.split_whitespace();
            let (Some(mac), Some(ip), Some(exp)) = (f.next(), f.next(), f.next()) else {
                continue;
            };
            let (Some(mac), Ok(ip), Ok(expires)) =
                (mac_bytes(mac), ip.parse::<Ipv4Addr>(), exp.parse::<u64>())
            else {
                continue;
            };
            if self.in_pool(ip) {
                self.by_mac.insert(
                    mac,
                    Lease {
                        ip,
                        expires,
                        bound: true,
                    },
                );
                n += 1;
            }
        }
        n
    }
}

/// The answering machine: a plan and, in mode dhcp, the leases.
#[derive(Debug, Clone)]
pub struct Responder {
    pub plan: Plan,
    pub leases: Option<Leases>,
}

impl Responder {
    pub fn new(plan: Plan) -> Responder {
        let leases = match (&plan.mode, &plan.pool) {
            (NetbootMode::Dhcp, Some(p)) => {
                let mut l = Leases::new(p.start, p.end);
                l.reserve(plan.server_ip);
                if let Some(r) = p.router {
                    l.reserve(r);
                }
                Some(l)
            }
            _ => None,
        };
        Responder { plan, leases }
    }

    /// Answer one packet, or say why not.
    pub fn handle(
        &mut self,
        packet: &[u8],
        port: Port,
        src: SocketAddrV4,
        now: u64,
    ) -> Result<Answer, DhcpError> {
        let msg = decode(packet)?;
        let req = classify(&msg)?;
        if let Some(ok) = &self.plan.clients {
            if !ok.contains(&req.mac) {
                return Err(DhcpError::Ignored("client not in netboot.clients"));
            }
        }
        match (self.plan.mode, port) {
            (NetbootMode::Off, _) => Err(DhcpError::Ignored("netboot is off")),
            (_, Port::Pxe) => self.pxe_port(&msg, &req, src),
            (NetbootMode::Proxy, Port::Dhcp) => self.proxy(&msg, &req),
            (NetbootMode::Dhcp, Port::Dhcp) => self.server(&msg, &req, now),
        }
    }

    /// A reply skeleton (RFC 2131 §4.3.1 table 3): the client's xid, flags, chaddr, giaddr.
    fn reply(&self, msg: &Message, kind: MessageType) -> Message {
        let mut r = Message::default();
        r.set_opcode(Opcode::BootReply)
            .set_htype(HType::Eth)
            .set_xid(msg.xid())
            .set_flags(msg.flags())
            .set_chaddr(&msg.chaddr()[..6])
            .set_giaddr(msg.giaddr());
        r.opts_mut().insert(DhcpOption::MessageType(kind));
        r.opts_mut()
            .insert(DhcpOption::ServerIdentifier(self.plan.server_ip));
        r
    }

    /// Where a reply to a client without an address goes: the relay agent's server port
    /// when relayed (RFC 2131 §4.1, giaddr), else broadcast.
    fn broadcast(msg: &Message) -> Dest {
        if msg.giaddr().is_unspecified() {
            Dest::Broadcast
        } else {
            Dest::Unicast(SocketAddrV4::new(msg.giaddr(), 67))
        }
    }

    /// Add the boot information; None when this client gets none.
    fn add_boot(&self, msg: &Message, req: &Request, r: &mut Message) -> Option<String> {
        let (file, class, siaddr) = boot_choice(&self.plan, req)?;
        // The BOOTP `file` field holds 128 bytes with its NUL; a longer URL goes in option 67
        // only (RFC 2132 §9.5).
        if file.len() < 128 {
            r.set_fname_str(&file);
        }
        // siaddr (next-server) always: iPXE takes a ProxyDHCP answer only when it carries
        // a next-server and a boot file name, or a PXE menu (its dhcp_has_pxeopts()).
        r.set_siaddr(self.plan.server_ip);
        if let Some(ip) = siaddr {
            r.opts_mut()
                .insert(DhcpOption::TFTPServerName(ip.to_string().into_bytes()));
        }
        r.opts_mut()
            .insert(DhcpOption::ClassIdentifier(class.as_bytes().to_vec()));
        r.opts_mut()
            .insert(DhcpOption::BootfileName(file.clone().into_bytes()));
        // PXE 2.1 §2.2.5: a PXE server echoes the client's UUID/GUID (option 97).
        if let Some(DhcpOption::ClientMachineIdentifier(id)) =
            msg.opts().get(OptionCode::ClientMachineIdentifier)
        {
            r.opts_mut()
                .insert(DhcpOption::ClientMachineIdentifier(id.clone()));
        }
        if req.kind == ClientKind::Pxe {
            // Option 43, PXE_DISCOVERY_CONTROL (tag 6) = 8: boot the file named here, skip
            // boot-server discovery and menus (PXE 2.1 §2.4.3).
            r.opts_mut()
                .insert(DhcpOption::VendorExtensions(vec![6, 1, 8, 255]));
        }
        Some(file)
    }

    fn encode(r: &Message) -> Result<Vec<u8>, DhcpError> {
        let mut buf = Vec::with_capacity(576);
        r.encode(&mut Encoder::new(&mut buf))
            .map_err(|e| DhcpError::Malformed(format!("encoding the answer: {e}")))?;
        Ok(buf)
    }

    fn answer(
        r: &Message,
        to: Dest,
        kind: MessageType,
        boot: Option<String>,
        changed: bool,
    ) -> Result<Answer, DhcpError> {
        Ok(Answer {
            bytes: Self::encode(r)?,
            to,
            kind,
            boot,
            leases_changed: changed,
        })
    }

    /// Port 4011: a PXE client (or iPXE) asks the boot server directly; the answer is an ACK
    /// unicast back to where it came from (PXE 2.1 §2.2.6).
    fn pxe_port(
        &self,
        msg: &Message,
        req: &Request,
        src: SocketAddrV4,
    ) -> Result<Answer, DhcpError> {
        if !matches!(req.msg_type, MessageType::Request | MessageType::Inform) {
            return Err(DhcpError::Ignored("port 4011 takes REQUEST or INFORM"));
        }
        let mut r = self.reply(msg, MessageType::Ack);
        r.set_ciaddr(msg.ciaddr());
        let boot = self
            .add_boot(msg, req, &mut r)
            .ok_or(DhcpError::Ignored("no boot file for this client"))?;
        Self::answer(&r, Dest::Unicast(src), MessageType::Ack, Some(boot), false)
    }

    /// Port 67 in proxy mode: a ProxyDHCP OFFER (no address) to a booting client's DISCOVER.
    fn proxy(&self, msg: &Message, req: &Request) -> Result<Answer, DhcpError> {
        if req.msg_type != MessageType::Discover {
            return Err(DhcpError::Ignored("proxyDHCP answers DISCOVERs on port 67"));
        }
        if req.kind == ClientKind::Plain {
            return Err(DhcpError::Ignored("not a network-boot client"));
        }
        let mut r = self.reply(msg, MessageType::Offer);
        let boot = self
            .add_boot(msg, req, &mut r)
            .ok_or(DhcpError::Ignored("no boot file for this client"))?;
        Self::answer(
            &r,
            Self::broadcast(msg),
            MessageType::Offer,
            Some(boot),
            false,
        )
    }

    fn add_lease_options(&self, r: &mut Message, secs: u32) {
        if let Some(p) = &self.plan.pool {
            let mask = Ipv4Addr::from(u32::MAX << (32 - u32::from(p.prefix_len)));
            r.opts_mut().insert(DhcpOption::SubnetMask(mask));
            if let Some(gw) = p.router {
                r.opts_mut().insert(DhcpOption::Router(vec![gw]));
            }
            if !p.dns.is_empty() {
                r.opts_mut()
                    .insert(DhcpOption::DomainNameServer(p.dns.clone()));
            }
        }
        r.opts_mut().insert(DhcpOption::AddressLeaseTime(secs));
        // RFC 2131 §4.4.5 defaults: T1 = 0.5, T2 = 0.875 of the lease.
        r.opts_mut().insert(DhcpOption::Renewal(secs / 2));
        r.opts_mut().insert(DhcpOption::Rebinding(secs / 8 * 7));
    }

    /// Port 67 in mode dhcp: a small DHCP server (RFC 2131 §4.3).
    fn server(&mut self, msg: &Message, req: &Request, now: u64) -> Result<Answer, DhcpError> {
        let Some(mut leases) = self.leases.take() else {
            return Err(DhcpError::Ignored("no address pool"));
        };
        let r = self.serve_with(&mut leases, msg, req, now);
        self.leases = Some(leases);
        r
    }

    fn serve_with(
        &self,
        leases: &mut Leases,
        msg: &Message,
        req: &Request,
        now: u64,
    ) -> Result<Answer, DhcpError> {
        let secs = self.plan.pool.as_ref().map_or(3600, |p| p.lease_secs);
        let server_ip = self.plan.server_ip;
        let requested = match msg.opts().get(OptionCode::RequestedIpAddress) {
            Some(DhcpOption::RequestedIpAddress(ip)) => Some(*ip),
            _ => None,
        };
        let server_id = match msg.opts().get(OptionCode::ServerIdentifier) {
            Some(DhcpOption::ServerIdentifier(ip)) => Some(*ip),
            _ => None,
        };
        match req.msg_type {
            MessageType::Discover => {
                let ip = leases
                    .offer(req.mac, requested, now)
                    .ok_or(DhcpError::Exhausted)?;
                let mut r = self.reply(msg, MessageType::Offer);
                r.set_yiaddr(ip);
                self.add_lease_options(&mut r, secs);
                let boot = self.add_boot(msg, req, &mut r);
                Self::answer(&r, Self::broadcast(msg), MessageType::Offer, boot, false)
            }
            MessageType::Request => {
                if server_id.is_some_and(|s| s != server_ip) {
                    // The client chose another server's offer (§4.3.2): forget ours.
                    if leases.get(&req.mac).is_some_and(|l| !l.bound) {
                        leases.release(&req.mac);
                    }
                    return Err(DhcpError::Ignored("REQUEST for another server"));
                }
                let ip = requested.or_else(|| {
                    let c = msg.ciaddr();
                    (!c.is_unspecified()).then_some(c)
                });
                let Some(ip) = ip else {
                    return Err(DhcpError::Ignored("REQUEST without an address"));
                };
                if leases.commit(req.mac, ip, now, secs) {
                    let mut r = self.reply(msg, MessageType::Ack);
                    r.set_yiaddr(ip).set_ciaddr(msg.ciaddr());
                    self.add_lease_options(&mut r, secs);
                    let boot = self.add_boot(msg, req, &mut r);
                    let to = if msg.ciaddr().is_unspecified() {
                        Self::broadcast(msg)
                    } else {
                        Dest::Unicast(SocketAddrV4::new(msg.ciaddr(), 68))
                    };
                    Self::answer(&r, to, MessageType::Ack, boot, true)
                } else if leases.get(&req.mac).is_none() && server_id.is_none() {
                    // §4.3.2 INIT-REBOOT: a server with no record of the client stays silent.
                    Err(DhcpError::Ignored(
                        "REQUEST from a client we have no lease for",
                    ))
                } else {
                    // §4.3.2: the address is wrong for this client: NAK, broadcast.
                    let mut r = self.reply(msg, MessageType::Nak);
                    r.set_flags(Flags::default().set_broadcast());
                    Self::answer(&r, Self::broadcast(msg), MessageType::Nak, None, false)
                }
            }
            MessageType::Release => {
                let changed = leases.release(&req.mac);
                if changed {
                    // No reply to a RELEASE (RFC 2131 §4.3.4); only persist.
                    self.silent_change()
                } else {
                    Err(DhcpError::Ignored("RELEASE of no lease"))
                }
            }
            MessageType::Decline => {
                let changed = leases.decline(&req.mac, now, secs);
                if changed {
                    self.silent_change()
                } else {
                    Err(DhcpError::Ignored("DECLINE of no lease"))
                }
            }
            MessageType::Inform => {
                let mut r = self.reply(msg, MessageType::Ack);
                r.set_ciaddr(msg.ciaddr());
                let boot = self.add_boot(msg, req, &mut r);
                let to = if msg.ciaddr().is_unspecified() {
                    Self::broadcast(msg)
                } else {
                    Dest::Unicast(SocketAddrV4::new(msg.ciaddr(), 68))
                };
                Self::answer(&r, to, MessageType::Ack, boot, false)
            }
            _ => Err(DhcpError::Ignored("not a client message")),
        }
    }

    /// A change with nothing to send: an empty answer the shell only persists.
    fn silent_change(&self) -> Result<Answer, DhcpError> {
        Ok(Answer {
            bytes: Vec::new(),
            to: Dest::Broadcast,
            kind: MessageType::Release,
            boot: None,
            leases_changed: true,
        })
    }
}

/// Build a client request (tests, fuzz seeds, the hostile tests): `kind` decides the
/// vendor/user classes, `arch` the option 93.
pub fn client_request(
    msg_type: MessageType,
    mac: [u8; 6],
    kind: ClientKind,
    arch: Option<u16>,
    extra: &[DhcpOption],
) -> Vec<u8> {
    let mut m = Message::new_with_id(
        0x1234_5678,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        &mac,
    );
    m.set_flags(Flags::default().set_broadcast());
    m.opts_mut().insert(DhcpOption::MessageType(msg_type));
    if let Some(a) = arch {
        m.opts_mut()
            .insert(DhcpOption::ClientSystemArchitecture(Architecture::from(a)));
    }
    let a = arch.unwrap_or(0);
    match kind {
        ClientKind::Pxe => {
            m.opts_mut().insert(DhcpOption::ClassIdentifier(
                format!("PXEClient:Arch:{a:05}:UNDI:003016").into_bytes(),
            ));
        }
        ClientKind::HttpBoot => {
            m.opts_mut().insert(DhcpOption::ClassIdentifier(
                format!("HTTPClient:Arch:{a:05}:UNDI:003016").into_bytes(),
            ));
        }
        ClientKind::Ipxe => {
            m.opts_mut().insert(DhcpOption::ClassIdentifier(
                format!("PXEClient:Arch:{a:05}:UNDI:002001").into_bytes(),
            ));
            m.opts_mut().insert(DhcpOption::UserClass(b"iPXE".to_vec()));
            m.opts_mut().insert(DhcpOption::Unknown(UnknownOption::new(
                175.into(),
                vec![1, 1, 1],
            )));
        }
        ClientKind::Plain => {}
    }
    for o in extra {
        m.opts_mut().insert(o.clone());
    }
    let mut buf = Vec::new();
    // Encoding our own message into a Vec cannot fail.
    let _ = m.encode(&mut Encoder::new(&mut buf));
    buf
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
    const SRC: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 68);

    fn plan(mode: NetbootMode) -> Plan {
        Plan {
            mode,
            server_ip: Ipv4Addr::new(10, 0, 0, 1),
            clients: None,
            boot_files: BootFilesConfig::default(),
            script_url: "http://10.0.0.1:8080/boot.ipxe?mac=${netX/mac}".into(),
            http_files: Some("http://10.0.0.1:8080/files/".into()),
            tftp: true,
            pool: (mode == NetbootMode::Dhcp).then(|| PoolConfig {
                start: Ipv4Addr::new(10, 0, 0, 100),
                end: Ipv4Addr::new(10, 0, 0, 102),
                prefix_len: 24,
                router: Some(Ipv4Addr::new(10, 0, 0, 254)),
                dns: vec![],
                lease_secs: 600,
            }),
        }
    }

    fn answer(r: &mut Responder, pkt: &[u8], port: Port) -> Result<(Message, Answer), DhcpError> {
        let a = r.handle(pkt, port, SRC, 1000)?;
        let m = Message::decode(&mut Decoder::new(&a.bytes)).unwrap();
        Ok((m, a))
    }

    /// The `file` field without the NUL dhcproto keeps when decoding.
    fn fname(m: &Message) -> &str {
        let f = m.fname().unwrap_or(&[]);
        std::str::from_utf8(f).unwrap().trim_end_matches('\0')
    }

    fn opt60(m: &Message) -> Vec<u8> {
        match m.opts().get(OptionCode::ClassIdentifier) {
            Some(DhcpOption::ClassIdentifier(v)) => v.clone(),
            _ => vec![],
        }
    }

    #[test]
    fn boot_file_per_architecture_and_client() {
        let mut r = Responder::new(plan(NetbootMode::Proxy));
        for (arch, file) in [
            (0, "undionly.kpxe"),
            (7, "snponly.efi"),
            (9, "snponly.efi"),
            (6, "ipxe-ia32.efi"),
            (11, "snponly-arm64.efi"),
        ] {
            let p = client_request(MessageType::Discover, MAC, ClientKind::Pxe, Some(arch), &[]);
            let (m, a) = answer(&mut r, &p, Port::Dhcp).unwrap();
            assert_eq!(fname(&m), file, "arch {arch}");
            assert_eq!(
                m.yiaddr(),
                Ipv4Addr::UNSPECIFIED,
                "proxyDHCP never offers an address"
            );
            assert_eq!(m.siaddr(), Ipv4Addr::new(10, 0, 0, 1));
            assert_eq!(m.opts().msg_type(), Some(MessageType::Offer));
            assert_eq!(opt60(&m), b"PXEClient");
            assert_eq!(m.xid(), 0x1234_5678);
            assert_eq!(a.to, Dest::Broadcast);
        }
        // Arch from the vendor class when option 93 is missing.
        let mut p = client_request(MessageType::Discover, MAC, ClientKind::Pxe, None, &[]);
        let m = decode(&p).unwrap();
        assert_eq!(classify(&m).unwrap().arch, Arch::Bios);
        p = client_request(
            MessageType::Discover,
            MAC,
            ClientKind::Plain,
            None,
            &[DhcpOption::ClassIdentifier(
                b"PXEClient:Arch:00007:UNDI:003016".to_vec(),
            )],
        );
        assert_eq!(classify(&decode(&p).unwrap()).unwrap().arch, Arch::UefiX64);
        // ARM32 has no binary: silence.
        let p = client_request(MessageType::Discover, MAC, ClientKind::Pxe, Some(10), &[]);
        assert_eq!(
            r.handle(&p, Port::Dhcp, SRC, 0).err(),
            Some(DhcpError::Ignored("no boot file for this client"))
        );
    }

    #[test]
    fn ipxe_gets_the_script_and_http_boot_a_url() {
        let mut r = Responder::new(plan(NetbootMode::Proxy));
        for arch in [0, 7] {
            let p = client_request(
                MessageType::Discover,
                MAC,
                ClientKind::Ipxe,
                Some(arch),
                &[],
            );
            let (m, _) = answer(&mut r, &p, Port::Dhcp).unwrap();
            assert_eq!(fname(&m), "http://10.0.0.1:8080/boot.ipxe?mac=${netX/mac}");
        }
        // Option 175 alone marks iPXE too.
        let p = client_request(
            MessageType::Discover,
            MAC,
            ClientKind::Pxe,
            Some(0),
            &[DhcpOption::Unknown(UnknownOption::new(
                175.into(),
                vec![0x13, 1, 1],
            ))],
        );
        assert_eq!(
            classify(&decode(&p).unwrap()).unwrap().kind,
            ClientKind::Ipxe
        );
        let p = client_request(
            MessageType::Discover,
            MAC,
            ClientKind::HttpBoot,
            Some(16),
            &[],
        );
        let (m, _) = answer(&mut r, &p, Port::Dhcp).unwrap();
        assert_eq!(fname(&m), "http://10.0.0.1:8080/files/snponly.efi");
        assert_eq!(opt60(&m), b"HTTPClient");
        // Without the HTTP endpoint, HTTP Boot clients get nothing.
        r.plan.http_files = None;
        assert!(r.handle(&p, Port::Dhcp, SRC, 0).is_err());
    }

    #[test]
    fn only_accepted_and_booting_clients_are_answered() {
        let mut pl = plan(NetbootMode::Proxy);
        pl.clients = Some([[2, 0, 0, 0, 0, 1]].into_iter().collect());
        let mut r = Responder::new(pl);
        let p = client_request(MessageType::Discover, MAC, ClientKind::Pxe, Some(0), &[]);
        assert_eq!(
            r.handle(&p, Port::Dhcp, SRC, 0).err(),
            Some(DhcpError::Ignored("client not in netboot.clients"))
        );
        let p = client_request(
            MessageType::Discover,
            [2, 0, 0, 0, 0, 1],
            ClientKind::Pxe,
            Some(0),
            &[],
        );
        assert!(r.handle(&p, Port::Dhcp, SRC, 0).is_ok());
        // An OS's DHCP: not ours in proxy mode.
        let p = client_request(
            MessageType::Discover,
            [2, 0, 0, 0, 0, 1],
            ClientKind::Plain,
            None,
            &[],
        );
        assert!(r.handle(&p, Port::Dhcp, SRC, 0).is_err());
        // REQUEST on 67 goes to the site's server.
        let p = client_request(
            MessageType::Request,
            [2, 0, 0, 0, 0, 1],
            ClientKind::Pxe,
            Some(0),
            &[],
        );
        assert!(r.handle(&p, Port::Dhcp, SRC, 0).is_err());
        // Off answers nothing.
        r.plan.mode = NetbootMode::Off;
        let p = client_request(
            MessageType::Discover,
            [2, 0, 0, 0, 0, 1],
            ClientKind::Pxe,
            Some(0),
            &[],
        );
        assert!(r.handle(&p, Port::Dhcp, SRC, 0).is_err());
    }

    #[test]
    fn relayed_requests_are_answered_to_the_relay() {
        let mut r = Responder::new(plan(NetbootMode::Proxy));
        let mut p = client_request(MessageType::Discover, MAC, ClientKind::Pxe, Some(0), &[]);
        p[24..28].copy_from_slice(&[10, 9, 0, 1]); // giaddr
        let a = r.handle(&p, Port::Dhcp, SRC, 0).unwrap();
        assert_eq!(
            a.to,
            Dest::Unicast(SocketAddrV4::new(Ipv4Addr::new(10, 9, 0, 1), 67))
        );
        assert_eq!(
            decode(&a.bytes).unwrap().giaddr(),
            Ipv4Addr::new(10, 9, 0, 1)
        );
    }

    #[test]
    fn port_4011_acks_unicast() {
        let mut r = Responder::new(plan(NetbootMode::Proxy));
        let src = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 150), 68);
        let uuid = DhcpOption::ClientMachineIdentifier(vec![0; 17]);
        let p = client_request(
            MessageType::Request,
            MAC,
            ClientKind::Pxe,
            Some(7),
            std::slice::from_ref(&uuid),
        );
        let a = r.handle(&p, Port::Pxe, src, 0).unwrap();
        assert_eq!(a.to, Dest::Unicast(src));
        let m = decode(&a.bytes).unwrap();
        assert_eq!(m.opts().msg_type(), Some(MessageType::Ack));
        assert_eq!(fname(&m), "snponly.efi");
        assert_eq!(
            m.opts().get(OptionCode::ClientMachineIdentifier),
            Some(&uuid)
        );
        let p = client_request(MessageType::Discover, MAC, ClientKind::Pxe, Some(7), &[]);
        assert!(r.handle(&p, Port::Pxe, src, 0).is_err());
    }

    #[test]
    fn dhcp_mode_leases() {
        let mut r = Responder::new(plan(NetbootMode::Dhcp));
        let p = client_request(MessageType::Discover, MAC, ClientKind::Pxe, Some(0), &[]);
        let (m, _) = answer(&mut r, &p, Port::Dhcp).unwrap();
        assert_eq!(m.yiaddr(), Ipv4Addr::new(10, 0, 0, 100));
        assert_eq!(fname(&m), "undionly.kpxe");
        assert_eq!(
            m.opts().get(OptionCode::SubnetMask),
            Some(&DhcpOption::SubnetMask(Ipv4Addr::new(255, 255, 255, 0)))
        );
        let req = client_request(
            MessageType::Request,
            MAC,
            ClientKind::Pxe,
            Some(0),
            &[
                DhcpOption::RequestedIpAddress(Ipv4Addr::new(10, 0, 0, 100)),
                DhcpOption::ServerIdentifier(Ipv4Addr::new(10, 0, 0, 1)),
            ],
        );
        let (m, a) = answer(&mut r, &req, Port::Dhcp).unwrap();
        assert_eq!(m.opts().msg_type(), Some(MessageType::Ack));
        assert!(a.leases_changed);
        // A plain client gets an address and no boot file.
        let other = [2, 0, 0, 0, 0, 2];
        let p = client_request(MessageType::Discover, other, ClientKind::Plain, None, &[]);
        let (m, _) = answer(&mut r, &p, Port::Dhcp).unwrap();
        assert_eq!(m.yiaddr(), Ipv4Addr::new(10, 0, 0, 101));
        assert_eq!(m.fname(), None);
        // Asking for someone else's address: NAK.
        let bad = client_request(
            MessageType::Request,
            other,
            ClientKind::Plain,
            None,
            &[DhcpOption::RequestedIpAddress(Ipv4Addr::new(10, 0, 0, 100))],
        );
        let (m, _) = answer(&mut r, &bad, Port::Dhcp).unwrap();
        assert_eq!(m.opts().msg_type(), Some(MessageType::Nak));
        // A client we never saw (INIT-REBOOT, no server id): silence, not NAK.
        let stranger = client_request(
            MessageType::Request,
            [2, 0, 0, 0, 0, 3],
            ClientKind::Plain,
            None,
            &[DhcpOption::RequestedIpAddress(Ipv4Addr::new(10, 0, 0, 101))],
        );
        assert!(r.handle(&stranger, Port::Dhcp, SRC, 1000).is_err());
        // Persisted leases come back; only bound ones are written.
        let text = r.leases.as_ref().unwrap().to_text();
        assert_eq!(text.lines().count(), 2, "{text}");
        let mut l = Leases::new(Ipv4Addr::new(10, 0, 0, 100), Ipv4Addr::new(10, 0, 0, 102));
        assert_eq!(l.load_text(&format!("{text}garbage\n1 2 3\n")), 1);
        assert_eq!(l.get(&MAC).unwrap().ip, Ipv4Addr::new(10, 0, 0, 100));
        // The same client is offered its address again after a restart.
        assert_eq!(l.offer(MAC, None, 1001), Some(Ipv4Addr::new(10, 0, 0, 100)));
    }

    #[test]
    fn pool_exhaustion_and_expiry() {
        let mut l = Leases::new(Ipv4Addr::new(10, 0, 0, 100), Ipv4Addr::new(10, 0, 0, 101));
        assert!(l.offer([1; 6], None, 0).is_some());
        assert!(l.offer([2; 6], None, 0).is_some());
        assert_eq!(l.offer([3; 6], None, 0), None);
        // Offers are held for OFFER_HOLD_SECS only.
        assert!(l.offer([3; 6], None, OFFER_HOLD_SECS + 1).is_some());
        // A flood of new MACs never grows the table beyond the pool.
        for i in 0..1000u32 {
            let mac = [9, 9, 0, (i >> 16) as u8, (i >> 8) as u8, i as u8];
            l.offer(mac, None, 1000 + u64::from(i) * (OFFER_HOLD_SECS + 1));
        }
        assert!(l.by_mac.len() <= 2, "{}", l.by_mac.len());
        assert!(!l.commit([4; 6], Ipv4Addr::new(10, 0, 0, 100), 0, 600));
        // Our own address is never offered.
        let mut l = Leases::new(Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2));
        l.reserve(Ipv4Addr::new(10, 0, 0, 1));
        assert_eq!(l.offer([1; 6], None, 0), Some(Ipv4Addr::new(10, 0, 0, 2)));
        assert_eq!(l.offer([2; 6], Some(Ipv4Addr::new(10, 0, 0, 1)), 0), None);
        assert!(!l.commit([1; 6], Ipv4Addr::new(10, 0, 0, 200), 0, 600));
    }

    #[test]
    fn bad_packets_are_refused() {
        let good = client_request(MessageType::Discover, MAC, ClientKind::Pxe, Some(0), &[]);
        let mut r = Responder::new(plan(NetbootMode::Proxy));
        for n in [0, 1, 100, 239, 243] {
            assert!(
                r.handle(&good[..n.min(good.len())], Port::Dhcp, SRC, 0)
                    .is_err(),
                "{n}"
            );
        }
        assert!(r.handle(&vec![0u8; 4000], Port::Dhcp, SRC, 0).is_err());
        let mut bad = good.clone();
        bad[236] = 0;
        assert!(matches!(
            r.handle(&bad, Port::Dhcp, SRC, 0),
            Err(DhcpError::Malformed(_))
        ));
        // An option whose length dhcproto only debug-asserts, alone or concatenated from
        // two adjacent ones (RFC 3396), or at the end without an END option.
        for tail in [
            &[94, 1, 1, 255][..],
            &[94, 3, 1, 2, 3, 94, 3, 1, 2, 3, 255],
            &[94, 2, 1, 2],
            &[80, 1, 0, 255],
        ] {
            let mut bad = good[..good.len() - 1].to_vec();
            bad.extend_from_slice(tail);
            assert!(
                matches!(
                    r.handle(&bad, Port::Dhcp, SRC, 0),
                    Err(DhcpError::Malformed(_))
                ),
                "{tail:?}"
            );
        }
        // Separated by a PAD they are two options.
        let mut two = good[..good.len() - 1].to_vec();
        two.extend_from_slice(&[94, 3, 1, 2, 3, 0, 94, 3, 1, 2, 3, 255]);
        assert!(r.handle(&two, Port::Dhcp, SRC, 0).is_ok());
        // A reply (BOOTREPLY) is not a request.
        let mut bad = good.clone();
        bad[0] = 2;
        assert!(r.handle(&bad, Port::Dhcp, SRC, 0).is_err());
        // Unknown options are carried, not fatal.
        let mut unk = good[..good.len() - 1].to_vec();
        unk.extend_from_slice(&[222, 3, 1, 2, 3, 255]);
        assert!(r.handle(&unk, Port::Dhcp, SRC, 0).is_ok());
    }
}
