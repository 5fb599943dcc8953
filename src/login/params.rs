//! Negotiated session and connection parameters (RFC 7143 §13).

/// Normal or Discovery session (§13.21).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SessionType {
    #[default]
    Normal,
    Discovery,
}

/// What the target offers / accepts. Defaults are what a boot server wants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OurParams {
    /// Our declared MaxRecvDataSegmentLength (what the initiator may send us in one PDU).
    pub max_recv_data_segment_length: u32,
    pub max_burst_length: u32,
    pub first_burst_length: u32,
    pub max_outstanding_r2t: u32,
    pub immediate_data: bool,
    pub initial_r2t: bool,
    pub max_connections: u16,
    pub default_time2wait: u16,
    pub default_time2retain: u16,
    pub error_recovery_level: u8,
    /// Accept CRC32C header/data digests when the initiator offers them.
    pub allow_header_digest: bool,
    pub allow_data_digest: bool,
}

impl Default for OurParams {
    fn default() -> Self {
        OurParams {
            max_recv_data_segment_length: 262_144,
            max_burst_length: 1_048_576,
            first_burst_length: 262_144,
            max_outstanding_r2t: 1,
            immediate_data: true,
            initial_r2t: false,
            max_connections: 1,
            default_time2wait: 2,
            default_time2retain: 20,
            error_recovery_level: 0,
            allow_header_digest: true,
            allow_data_digest: true,
        }
    }
}

/// The outcome of negotiation, used by the session/connection for the full-feature phase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionParams {
    pub session_type: SessionType,
    pub initiator_name: String,
    pub initiator_alias: Option<String>,
    /// Empty for discovery sessions.
    pub target_name: String,
    pub header_digest: bool,
    pub data_digest: bool,
    pub max_connections: u16,
    pub initial_r2t: bool,
    pub immediate_data: bool,
    pub max_burst_length: u32,
    pub first_burst_length: u32,
    pub default_time2wait: u16,
    pub default_time2retain: u16,
    pub max_outstanding_r2t: u32,
    pub data_pdu_in_order: bool,
    pub data_sequence_in_order: bool,
    pub error_recovery_level: u8,
    /// Largest data segment we may SEND (the initiator's declared MaxRecvDataSegmentLength;
    /// 8192 when it declared none, §13.12).
    pub initiator_max_recv_data_segment_length: u32,
    /// Largest data segment we ACCEPT (our declaration).
    pub target_max_recv_data_segment_length: u32,
}
