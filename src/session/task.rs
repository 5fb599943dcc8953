//! SCSI task plumbing between iSCSI and the SCSI layer (RFC 7143 §4.2.5, §11.3, §11.7-8):
//! collecting Data-Out (immediate, unsolicited, solicited by R2T) into one buffer, and cutting
//! a command's result into Data-In PDUs and a SCSI Response. Pure: no sockets.

use crate::login::SessionParams;
use crate::pdu::{Bhs, DataIn, DataOut, Pdu, R2t, ScsiResponse};
use crate::storage::FileSlice;
use bytes::{BufMut, Bytes, BytesMut};
use std::collections::VecDeque;

/// TTT value meaning "no transfer tag" (§11.8.2, unsolicited Data-Out).
pub const NO_TTT: u32 = 0xffff_ffff;

/// Residual between the expected data transfer length and what the command moved (§11.4.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Residual {
    None,
    Overflow(u32),
    Underflow(u32),
}

impl Residual {
    /// `wanted` = what the command wants to move, `expected` = the initiator's EDTL.
    pub fn of(wanted: u32, expected: u32) -> Self {
        use std::cmp::Ordering::*;
        match wanted.cmp(&expected) {
            Equal => Residual::None,
            Greater => Residual::Overflow(wanted - expected),
            Less => Residual::Underflow(expected - wanted),
        }
    }
    fn flags(self) -> (bool, bool, u32) {
        match self {
            Residual::None => (false, false, 0),
            Residual::Overflow(n) => (true, false, n),
            Residual::Underflow(n) => (false, true, n),
        }
    }
}

/// Why a Data-Out PDU cannot be accepted; all are protocol errors at ERL 0 (§7.1.4).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DataOutError {
    #[error("unsolicited data not allowed (InitialR2T=Yes)")]
    UnsolicitedNotAllowed,
    #[error("data beyond the first burst")]
    BeyondFirstBurst,
    #[error("unknown target transfer tag {0:#x}")]
    UnknownTtt(u32),
    #[error("DataSN {got}, expected {expected}")]
    DataSn { got: u32, expected: u32 },
    #[error("buffer offset {got}, expected {expected}")]
    Offset { got: u32, expected: u32 },
    #[error("data beyond the R2T's desired length")]
    BeyondR2t,
    #[error("immediate data not negotiated or longer than allowed")]
    ImmediateData,
}

#[derive(Debug)]
struct Outstanding {
    ttt: u32,
    offset: u32,
    len: u32,
    received: u32,
    next_data_sn: u32,
}

/// Collects the Data-Out of one write command. DataPDUInOrder and DataSequenceInOrder are
/// always Yes (we answer Yes and the result functions are OR, §13.19-20), so data arrives in
/// increasing offset order and is appended.
#[derive(Debug)]
pub struct WriteCollector {
    /// Bytes the initiator will send: the unsolicited part it sends anyway, then what we
    /// solicit.
    total: u32,
    /// Bytes the command uses: min(SCSI transfer length, EDTL) (FCP-4 §9.4.2 / SAM-5 §5.4.2:
    /// data beyond the EDTL is neither requested nor transferred).
    wanted: u32,
    buf: BytesMut,
    unsolicited_end: u32,
    unsol_data_sn: u32,
    next_r2t_offset: u32,
    r2t_sn: u32,
    outstanding: VecDeque<Outstanding>,
}

impl WriteCollector {
    /// `edtl` is the initiator's expected data transfer length, `transfer` the length the CDB
    /// asks for; `immediate` the SCSI Command PDU's data segment.
    pub fn new(
        params: &SessionParams,
        edtl: u32,
        transfer: u32,
        immediate: &[u8],
    ) -> Result<Self, DataOutError> {
        let imm = immediate.len() as u32;
        let wanted = transfer.min(edtl);
        if imm > 0 && (!params.immediate_data || imm > params.first_burst_length || imm > edtl) {
            return Err(DataOutError::ImmediateData);
        }
        // §13.13-14: with InitialR2T=No the initiator sends unsolicited data up to
        // FirstBurstLength (or the whole transfer if shorter) without waiting for an R2T.
        let unsolicited_end = if params.initial_r2t {
            imm
        } else {
            params.first_burst_length.min(edtl).max(imm)
        };
        let total = unsolicited_end.max(wanted);
        let mut buf = BytesMut::with_capacity(total.min(16 << 20) as usize);
        buf.put_slice(immediate);
        Ok(WriteCollector {
            total,
            wanted,
            buf,
            unsolicited_end,
            unsol_data_sn: 0,
            next_r2t_offset: unsolicited_end,
            r2t_sn: 0,
            outstanding: VecDeque::new(),
        })
    }

    /// An empty collector, to stand in while the real one is borrowed.
    pub fn placeholder() -> Self {
        WriteCollector {
            total: 0,
            wanted: 0,
            buf: BytesMut::new(),
            unsolicited_end: 0,
            unsol_data_sn: 0,
            next_r2t_offset: 0,
            r2t_sn: 0,
            outstanding: VecDeque::new(),
        }
    }

    pub fn received(&self) -> u32 {
        self.buf.len() as u32
    }

    pub fn complete(&self) -> bool {
        self.received() == self.total
    }

    /// Number of R2Ts sent so far (ExpDataSN of the SCSI Response, §11.4.8).
    pub fn r2t_count(&self) -> u32 {
        self.r2t_sn
    }

    /// Accept one Data-Out PDU.
    pub fn data_out(
        &mut self,
        params: &SessionParams,
        hdr: &DataOut,
        data: &[u8],
    ) -> Result<(), DataOutError> {
        let len = data.len() as u32;
        let expected_offset = self.received();
        if hdr.ttt == NO_TTT {
            if params.initial_r2t {
                return Err(DataOutError::UnsolicitedNotAllowed);
            }
            if hdr.data_sn != self.unsol_data_sn {
                return Err(DataOutError::DataSn {
                    got: hdr.data_sn,
                    expected: self.unsol_data_sn,
                });
            }
            if hdr.buffer_offset != expected_offset {
                return Err(DataOutError::Offset {
                    got: hdr.buffer_offset,
                    expected: expected_offset,
                });
            }
            if expected_offset.saturating_add(len) > self.unsolicited_end {
                return Err(DataOutError::BeyondFirstBurst);
            }
            self.unsol_data_sn = self.unsol_data_sn.wrapping_add(1);
        } else {
            let r2t = self
                .outstanding
                .iter_mut()
                .find(|o| o.ttt == hdr.ttt)
                .ok_or(DataOutError::UnknownTtt(hdr.ttt))?;
            // §11.7.4: DataSN counts the Data-Out PDUs of one R2T sequence from 0.
            if hdr.data_sn != r2t.next_data_sn {
                return Err(DataOutError::DataSn {
                    got: hdr.data_sn,
                    expected: r2t.next_data_sn,
                });
            }
            let at = r2t.offset + r2t.received;
            if hdr.buffer_offset != at || at != expected_offset {
                return Err(DataOutError::Offset {
                    got: hdr.buffer_offset,
                    expected: at,
                });
            }
            if r2t.received.saturating_add(len) > r2t.len {
                return Err(DataOutError::BeyondR2t);
            }
            r2t.received += len;
            r2t.next_data_sn = r2t.next_data_sn.wrapping_add(1);
            if r2t.received == r2t.len {
                let ttt = hdr.ttt;
                self.outstanding.retain(|o| o.ttt != ttt);
            }
        }
        self.buf.put_slice(data);
        Ok(())
    }

    /// R2Ts to send now (up to MaxOutstandingR2T outstanding, each at most MaxBurstLength,
    /// §13.17, §13.13). `next_ttt` allocates transfer tags.
    pub fn next_r2ts(
        &mut self,
        params: &SessionParams,
        itt: u32,
        lun: u64,
        mut next_ttt: impl FnMut() -> u32,
    ) -> Vec<R2t> {
        let mut out = Vec::new();
        let max_out = params.max_outstanding_r2t.max(1) as usize;
        while self.outstanding.len() < max_out && self.next_r2t_offset < self.total {
            let len = (self.total - self.next_r2t_offset).min(params.max_burst_length.max(512));
            let ttt = next_ttt();
            self.outstanding.push_back(Outstanding {
                ttt,
                offset: self.next_r2t_offset,
                len,
                received: 0,
                next_data_sn: 0,
            });
            out.push(R2t {
                lun,
                itt,
                ttt,
                r2t_sn: self.r2t_sn,
                buffer_offset: self.next_r2t_offset,
                desired_data_transfer_length: len,
                ..Default::default()
            });
            self.r2t_sn = self.r2t_sn.wrapping_add(1);
            self.next_r2t_offset += len;
        }
        out
    }

    /// The data the command uses (unsolicited bytes beyond it are dropped).
    pub fn into_data(mut self) -> Bytes {
        self.buf.truncate(self.wanted as usize);
        self.buf.freeze()
    }
}

/// The PDUs that finish a command: Data-In PDUs (split by the initiator's
/// MaxRecvDataSegmentLength, a sequence ending with F at every MaxBurstLength, §11.7.1) and
/// either the status collapsed into the last Data-In (§11.7.3: only when there is no sense)
/// or a separate SCSI Response.
pub struct Completion<'a> {
    pub itt: u32,
    pub lun: u64,
    pub status: u8,
    pub sense: Option<&'a [u8]>,
    /// Data for the initiator, already cut to the EDTL.
    pub data: Bytes,
    pub residual: Residual,
    /// R2Ts sent for the command (writes), for ExpDataSN.
    pub r2t_count: u32,
}

impl Completion<'_> {
    /// The Data-In headers for `total` bytes and the range of the data each carries.
    fn data_in(
        &self,
        total: usize,
        max_seg: u32,
        max_burst: u32,
        mut each: impl FnMut(DataIn, usize, usize),
    ) -> u32 {
        let max_seg = max_seg.max(512) as usize;
        let max_burst = max_burst.max(512) as usize;
        let (o, u, residual_count) = self.residual.flags();
        let collapse = self.sense.is_none() && total > 0;
        let mut offset = 0usize;
        let mut data_sn = 0u32;
        while offset < total {
            // A PDU never crosses a burst boundary.
            let burst_left = max_burst - offset % max_burst;
            let len = max_seg.min(total - offset).min(burst_left);
            let end = offset + len;
            let last = end == total;
            let burst_end = last || end % max_burst == 0;
            let status_here = last && collapse;
            each(
                DataIn {
                    final_: burst_end,
                    status_present: status_here,
                    status: if status_here { self.status } else { 0 },
                    overflow: status_here && o,
                    underflow: status_here && u,
                    residual_count: if status_here { residual_count } else { 0 },
                    lun: self.lun,
                    itt: self.itt,
                    ttt: NO_TTT,
                    data_sn,
                    buffer_offset: offset as u32,
                    ..Default::default()
                },
                offset,
                end,
            );
            data_sn = data_sn.wrapping_add(1);
            offset = end;
        }
        data_sn
    }

    /// The Data-In PDUs of a result whose data lie in `file` (all of it, already cut to the
    /// EDTL; `self.data` unused): each PDU's data segment is its part of the file, to be
    /// sent with `sendfile`. Status is in the last one (no sense: a GOOD read).
    pub fn into_file_pdus(
        self,
        file: &FileSlice,
        max_seg: u32,
        max_burst: u32,
    ) -> Vec<(Pdu, FileSlice)> {
        let mut out = Vec::with_capacity(file.len / max_seg.max(512) as usize + 1);
        self.data_in(file.len, max_seg, max_burst, |d, from, to| {
            out.push((
                Pdu {
                    bhs: Bhs::DataIn(d),
                    data: Bytes::new(),
                },
                file.slice(from, to),
            ))
        });
        out
    }

    pub fn into_pdus(self, max_seg: u32, max_burst: u32, out: &mut Vec<Pdu>) {
        let total = self.data.len();
        let (o, u, residual_count) = self.residual.flags();
        let collapse = self.sense.is_none() && total > 0;
        let data_sn = self.data_in(total, max_seg, max_burst, |d, from, to| {
            out.push(Pdu {
                bhs: Bhs::DataIn(d),
                data: self.data.slice(from..to),
            })
        });
        if collapse {
            return;
        }
        let data = match self.sense {
            Some(sense) => {
                // §11.4.7.2: SenseLength (2 bytes) then the sense data.
                let mut b = BytesMut::with_capacity(2 + sense.len());
                b.put_u16(sense.len() as u16);
                b.put_slice(sense);
                b.freeze()
            }
            None => Bytes::new(),
        };
        out.push(Pdu {
            bhs: Bhs::ScsiResponse(ScsiResponse {
                overflow: o,
                underflow: u,
                residual_count,
                response: 0,
                status: self.status,
                itt: self.itt,
                exp_data_sn: data_sn.wrapping_add(self.r2t_count),
                ..Default::default()
            }),
            data,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::login::SessionType;

    fn params() -> SessionParams {
        SessionParams {
            session_type: SessionType::Normal,
            initiator_name: "i".into(),
            initiator_alias: None,
            target_name: "t".into(),
            header_digest: false,
            data_digest: false,
            max_connections: 1,
            initial_r2t: false,
            immediate_data: true,
            max_burst_length: 8192,
            first_burst_length: 4096,
            default_time2wait: 2,
            default_time2retain: 0,
            max_outstanding_r2t: 1,
            data_pdu_in_order: true,
            data_sequence_in_order: true,
            error_recovery_level: 0,
            initiator_max_recv_data_segment_length: 2048,
            target_max_recv_data_segment_length: 2048,
        }
    }

    fn dout(ttt: u32, sn: u32, off: u32) -> DataOut {
        DataOut {
            ttt,
            data_sn: sn,
            buffer_offset: off,
            ..Default::default()
        }
    }

    #[test]
    fn immediate_unsolicited_then_r2t() {
        let p = params();
        let mut w = WriteCollector::new(&p, 20000, 20000, &[1u8; 1024]).unwrap();
        let mut tags = 100..;
        let r2ts = w.next_r2ts(&p, 7, 0, || tags.next().unwrap());
        // Unsolicited covers the first 4096 bytes; R2Ts start there, one outstanding.
        assert_eq!(r2ts.len(), 1);
        assert_eq!(
            (r2ts[0].buffer_offset, r2ts[0].desired_data_transfer_length),
            (4096, 8192)
        );
        w.data_out(&p, &dout(NO_TTT, 0, 1024), &[2u8; 2048])
            .unwrap();
        assert_eq!(
            w.data_out(&p, &dout(NO_TTT, 0, 3072), &[2u8; 1024]),
            Err(DataOutError::DataSn {
                got: 0,
                expected: 1
            })
        );
        w.data_out(&p, &dout(NO_TTT, 1, 3072), &[2u8; 1024])
            .unwrap();
        assert!(matches!(
            w.data_out(&p, &dout(NO_TTT, 2, 4096), &[2u8; 4]),
            Err(DataOutError::BeyondFirstBurst)
        ));
        for i in 0..4 {
            w.data_out(&p, &dout(100, i, 4096 + i * 2048), &[3u8; 2048])
                .unwrap();
        }
        let r2ts = w.next_r2ts(&p, 7, 0, || tags.next().unwrap());
        assert_eq!(
            (r2ts[0].buffer_offset, r2ts[0].desired_data_transfer_length),
            (12288, 7712)
        );
        assert_eq!(
            w.data_out(&p, &dout(100, 4, 12288), &[0u8; 8]),
            Err(DataOutError::UnknownTtt(100))
        );
        w.data_out(&p, &dout(101, 0, 12288), &[4u8; 7712]).unwrap();
        assert!(w.complete());
        assert_eq!(w.r2t_count(), 2);
        let d = w.into_data();
        assert_eq!((d[0], d[1024], d[4096], d[19999]), (1, 2, 3, 4));
    }

    #[test]
    fn initial_r2t_refuses_unsolicited() {
        let mut p = params();
        p.initial_r2t = true;
        p.immediate_data = false;
        assert_eq!(
            WriteCollector::new(&p, 512, 512, &[0u8; 512]).err(),
            Some(DataOutError::ImmediateData)
        );
        let mut w = WriteCollector::new(&p, 512, 512, &[]).unwrap();
        assert_eq!(
            w.data_out(&p, &dout(NO_TTT, 0, 0), &[0u8; 512]),
            Err(DataOutError::UnsolicitedNotAllowed)
        );
        assert_eq!(w.next_r2ts(&p, 1, 0, || 5).len(), 1);
    }

    #[test]
    fn residual_writes_collect_what_the_initiator_sends() {
        let p = params();
        // EDTL 1024 > transfer 512: the initiator sends 1024 unsolicited; we keep 512.
        let mut w = WriteCollector::new(&p, 1024, 512, &[]).unwrap();
        assert!(w.next_r2ts(&p, 1, 0, || 9).is_empty());
        w.data_out(&p, &dout(NO_TTT, 0, 0), &[1u8; 1024]).unwrap();
        assert!(w.complete());
        assert_eq!(w.into_data().len(), 512);
        // EDTL 512 < transfer 8192: only 512 bytes are transferred.
        let mut w = WriteCollector::new(&p, 512, 8192, &[]).unwrap();
        w.data_out(&p, &dout(NO_TTT, 0, 0), &[1u8; 512]).unwrap();
        assert!(w.complete());
        assert_eq!(w.into_data().len(), 512);
    }

    #[test]
    fn data_in_split_and_collapse() {
        let data = Bytes::from(vec![9u8; 10000]);
        let mut out = Vec::new();
        Completion {
            itt: 3,
            lun: 0,
            status: 0,
            sense: None,
            data,
            residual: Residual::Underflow(240),
            r2t_count: 0,
        }
        .into_pdus(4096, 8192, &mut out);
        assert_eq!(out.len(), 3); // 4096, 4096 (burst end), 1808 + status
        let Bhs::DataIn(last) = &out[2].bhs else {
            panic!()
        };
        assert!(last.final_ && last.status_present && last.underflow);
        assert_eq!(last.residual_count, 240);
        let Bhs::DataIn(second) = &out[1].bhs else {
            panic!()
        };
        assert!(second.final_ && !second.status_present);
    }

    #[test]
    fn sense_goes_in_scsi_response() {
        let mut out = Vec::new();
        Completion {
            itt: 3,
            lun: 0,
            status: 2,
            sense: Some(&[0x70, 0, 5]),
            data: Bytes::new(),
            residual: Residual::None,
            r2t_count: 0,
        }
        .into_pdus(4096, 8192, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(&out[0].data[..], &[0, 3, 0x70, 0, 5]);
    }
}
