//! On-disk formats of an overlay directory (see docs/overlays.md): the snapshot file
//! (`overlay.meta`), the journal (`overlay.journal`) and their replay. Pure functions over
//! bytes, so `Overlay::open` and the offline `check` share one parser. Every length and
//! offset read from disk is checked: a damaged file yields an error, never a panic.
//!
//! Version 2 (the dense data file): overlay chunks live in slots of the data file, taken in
//! write order, and the snapshot extents and journal records carry the slot. Version 1
//! overlays (chunks at their own offset) are still read: their chunks map to the slot of
//! their own index, and the first compaction rewrites the snapshot as version 2.
use super::extents::{ChunkState, ExtentMap, Run};

pub(crate) const META_MAGIC: &[u8; 8] = b"DLOVMETA";
pub(crate) const JOURNAL_MAGIC: &[u8; 8] = b"DLOVJRNL";
/// The version written; version 1 is still read.
pub(crate) const VERSION: u32 = 2;
/// Journal header size in bytes.
pub(crate) const JOURNAL_HEADER: u64 = 32;
/// Version 1 journal record: seq, start, count, state, padding, crc.
const RECORD_V1: usize = 32;
/// Version 2 journal record: seq, start, count, slot, state, padding, crc.
pub(crate) const RECORD: usize = 48;
/// Fixed part of the snapshot header, before the id string.
const META_FIXED: usize = 64;
/// One extent in a version 1 snapshot: start u64, end u64, state u8, 7 bytes of padding.
const EXTENT_V1: usize = 24;
/// Version 2: start u64, end u64, slot u64, state u8, 7 bytes of padding.
const EXTENT: usize = 32;
/// Refuse absurd golden ids (the id is meant for a path plus mtime/length).
pub(crate) const MAX_ID: usize = 4096;

/// The snapshot: golden identity plus the chunk map as of journal sequence `last_seq`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Meta {
    pub block_size: u32,
    pub golden_size: u64,
    pub chunk_size: u32,
    pub golden_id: Option<String>,
    pub generation: u64,
    pub last_seq: u64,
    /// Slots below this may be named by the snapshot or the journal: the slot counter never
    /// restarts below it (version 1: the chunk count, the data file being device-sized).
    pub next_slot: u64,
    /// The non-golden runs, with their slots.
    pub extents: Vec<Run>,
    /// The version the snapshot was read in (`encode` always writes [`VERSION`]); it also
    /// says how the journal's records are laid out.
    pub version: u32,
}

impl Meta {
    pub(crate) fn chunks(&self) -> u64 {
        self.golden_size.div_ceil(u64::from(self.chunk_size))
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        let id = self.golden_id.as_deref().unwrap_or("").as_bytes();
        let mut b = Vec::with_capacity(META_FIXED + id.len() + self.extents.len() * EXTENT + 4);
        b.extend_from_slice(META_MAGIC);
        b.extend_from_slice(&VERSION.to_le_bytes());
        b.extend_from_slice(&self.block_size.to_le_bytes());
        b.extend_from_slice(&self.golden_size.to_le_bytes());
        b.extend_from_slice(&self.chunk_size.to_le_bytes());
        // id length + 1 so that "no id" and "empty id" differ.
        let id_field = self
            .golden_id
            .as_ref()
            .map_or(0u32, |_| id.len() as u32 + 1);
        b.extend_from_slice(&id_field.to_le_bytes());
        b.extend_from_slice(&self.generation.to_le_bytes());
        b.extend_from_slice(&self.last_seq.to_le_bytes());
        b.extend_from_slice(&(self.extents.len() as u64).to_le_bytes());
        b.extend_from_slice(&self.next_slot.to_le_bytes());
        b.resize(META_FIXED, 0);
        b.extend_from_slice(id);
        for r in &self.extents {
            b.extend_from_slice(&r.start.to_le_bytes());
            b.extend_from_slice(&r.end.to_le_bytes());
            b.extend_from_slice(&r.slot.to_le_bytes());
            b.push(r.state.to_byte());
            b.extend_from_slice(&[0u8; 7]);
        }
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b
    }

    pub(crate) fn decode(b: &[u8]) -> Result<Meta, String> {
        let body_len = b
            .len()
            .checked_sub(4)
            .ok_or_else(|| "snapshot file too short".to_string())?;
        let (body, crc) = b.split_at(body_len);
        if u32_at(crc, 0) != Some(crc32c::crc32c(body)) {
            return Err("snapshot checksum mismatch".into());
        }
        if body.get(..8) != Some(&META_MAGIC[..]) {
            return Err("not an overlay snapshot (bad magic)".into());
        }
        let bad = || "snapshot header truncated".to_string();
        let version = u32_at(body, 8).ok_or_else(bad)?;
        let ext_size = match version {
            1 => EXTENT_V1,
            VERSION => EXTENT,
            _ => return Err(format!("unsupported snapshot version {version}")),
        };
        let block_size = u32_at(body, 12).ok_or_else(bad)?;
        let golden_size = u64_at(body, 16).ok_or_else(bad)?;
        let chunk_size = u32_at(body, 24).ok_or_else(bad)?;
        let id_field = u32_at(body, 28).ok_or_else(bad)? as usize;
        let generation = u64_at(body, 32).ok_or_else(bad)?;
        let last_seq = u64_at(body, 40).ok_or_else(bad)?;
        let n_ext = u64_at(body, 48).ok_or_else(bad)?;
        let stored_next_slot = u64_at(body, 56).ok_or_else(bad)?;
        validate_geometry(block_size, chunk_size, golden_size)?;
        let id_len = id_field.saturating_sub(1);
        if id_len > MAX_ID {
            return Err("golden id too long".into());
        }
        let id_end = META_FIXED + id_len;
        let golden_id = if id_field == 0 {
            None
        } else {
            let raw = body.get(META_FIXED..id_end).ok_or_else(bad)?;
            Some(
                String::from_utf8(raw.to_vec())
                    .map_err(|_| "golden id is not UTF-8".to_string())?,
            )
        };
        let ext_bytes = body.get(id_end..).ok_or_else(bad)?;
        if u64::try_from(ext_bytes.len()).ok() != n_ext.checked_mul(ext_size as u64) {
            return Err("snapshot extent count does not match its length".into());
        }
        let chunks = golden_size.div_ceil(u64::from(chunk_size));
        // Version 1: the data file is device-sized, every chunk in the slot of its index.
        let next_slot = if version == 1 {
            chunks
        } else {
            stored_next_slot
        };
        let mut extents = Vec::new();
        let mut prev_end = 0;
        let mut slots = Vec::new();
        for e in ext_bytes.chunks_exact(ext_size) {
            let (s, end) = (u64_at(e, 0).ok_or_else(bad)?, u64_at(e, 8).ok_or_else(bad)?);
            let (slot, state_at) = if version == 1 {
                (s, 16)
            } else {
                (u64_at(e, 16).ok_or_else(bad)?, 24)
            };
            let st = e
                .get(state_at)
                .copied()
                .and_then(ChunkState::from_byte)
                .ok_or_else(|| "snapshot extent has a bad state".to_string())?;
            if s < prev_end || s >= end || end > chunks || st == ChunkState::Golden {
                return Err(format!("snapshot extent {s}..{end} out of order or range"));
            }
            let slot = if st == ChunkState::Overlay {
                if slot.checked_add(end - s).is_none_or(|x| x > next_slot) {
                    return Err(format!(
                        "snapshot extent {s}..{end} names slots from {slot}, past the slot \
                         counter {next_slot}"
                    ));
                }
                slots.push((slot, slot + (end - s)));
                slot
            } else {
                0
            };
            prev_end = end;
            extents.push(Run {
                start: s,
                end,
                state: st,
                slot,
            });
        }
        // Two chunks in one slot would read each other's data.
        slots.sort_unstable();
        if slots.windows(2).any(|w| w[0].1 > w[1].0) {
            return Err("snapshot extents share data-file slots".into());
        }
        Ok(Meta {
            block_size,
            golden_size,
            chunk_size,
            golden_id,
            generation,
            last_seq,
            next_slot,
            extents,
            version,
        })
    }
}

/// Block size 512 or 4096; chunk a power of two, at least a block, at most 1 MiB; size a
/// non-zero whole number of blocks.
pub(crate) fn validate_geometry(block: u32, chunk: u32, size: u64) -> Result<(), String> {
    if block != 512 && block != 4096 {
        return Err(format!("block size {block} is not 512 or 4096"));
    }
    if !chunk.is_power_of_two() || chunk < block || chunk > (1 << 20) {
        return Err(format!(
            "chunk size {chunk} must be a power of two from the block size to 1 MiB"
        ));
    }
    if size == 0 || size % u64::from(block) != 0 {
        return Err(format!(
            "size {size} is not a whole non-zero number of blocks"
        ));
    }
    Ok(())
}

pub(crate) fn journal_header(generation: u64) -> [u8; JOURNAL_HEADER as usize] {
    let mut h = [0u8; JOURNAL_HEADER as usize];
    h[..8].copy_from_slice(JOURNAL_MAGIC);
    h[8..16].copy_from_slice(&generation.to_le_bytes());
    let crc = crc32c::crc32c(&h[..28]);
    h[28..].copy_from_slice(&crc.to_le_bytes());
    h
}

/// One state change: chunks `[start, start + count)` became `state`; overlay chunks are in
/// slots `slot..slot + count` of the data file (`slot` is 0 for other states).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Rec {
    pub start: u64,
    pub count: u64,
    pub state: ChunkState,
    pub slot: u64,
}

/// Append a version 2 record (48 bytes).
pub(crate) fn encode_record(seq: u64, r: &Rec, out: &mut Vec<u8>) {
    let at = out.len();
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&r.start.to_le_bytes());
    out.extend_from_slice(&r.count.to_le_bytes());
    out.extend_from_slice(&r.slot.to_le_bytes());
    out.push(r.state.to_byte());
    out.extend_from_slice(&[0u8; 11]);
    let crc = crc32c::crc32c(out.get(at..).unwrap_or(&[]));
    out.extend_from_slice(&crc.to_le_bytes());
}

/// A version 1 record (32 bytes, identity slots), for tests of the upgrade path.
/// A version 1 record (32 bytes, identity slots), for tests of the upgrade path.
#[cfg(test)]
pub(crate) fn encode_record_v1(seq: u64, r: &Rec, out: &mut Vec<u8>) {
    let at = out.len();
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&r.start.to_le_bytes());
    out.extend_from_slice(&r.count.to_le_bytes());
    out.push(r.state.to_byte());
    out.extend_from_slice(&[0u8; 3]);
    let crc = crc32c::crc32c(out.get(at..).unwrap_or(&[]));
    out.extend_from_slice(&crc.to_le_bytes());
}

/// The result of replaying a journal over a snapshot.
#[derive(Debug)]
pub(crate) struct Replay {
    pub map: ExtentMap,
    /// Records applied.
    pub records: u64,
    /// The sequence number the next record must carry.
    pub next_seq: u64,
    /// The slot counter: past every slot the snapshot or a replayed record ever named, so a
    /// journaled slot is never handed out twice. Slots taken but never journaled before a
    /// crash are garbage and are taken again.
    pub next_slot: u64,
    /// Bytes after the last valid record (a torn tail from a crash, or stale records).
    pub ignored_bytes: u64,
    /// The journal header is missing, torn, or from another generation: no record applies.
    pub stale_header: bool,
    /// Records with a valid checksum and sequence but impossible contents (never written by
    /// a correct overlay): replay stops there.
    pub problems: Vec<String>,
}

/// Apply the journal `j` to the snapshot. Replay stops at the first record that is torn, has
/// a bad checksum, or does not carry the next sequence number: records are appended in order
/// and made durable together, so everything before that point is valid (RFC-style write-ahead
/// log prefix semantics) and nothing after it can be trusted.
pub(crate) fn replay(meta: &Meta, j: &[u8]) -> Replay {
    let mut map = ExtentMap::new();
    for r in &meta.extents {
        map.set_run(r.start, r.end, r.state, r.slot);
    }
    let mut out = Replay {
        map,
        records: 0,
        next_seq: meta.last_seq.wrapping_add(1),
        next_slot: meta.next_slot,
        ignored_bytes: 0,
        stale_header: false,
        problems: Vec::new(),
    };
    let hdr = j.get(..JOURNAL_HEADER as usize);
    let header_ok = hdr.is_some_and(|h| {
        h.get(..8) == Some(&JOURNAL_MAGIC[..])
            && u32_at(h, 28) == Some(crc32c::crc32c(h.get(..28).unwrap_or(&[])))
            && u64_at(h, 8) == Some(meta.generation)
    });
    if !header_ok {
        out.stale_header = true;
        out.ignored_bytes = j.len() as u64;
        return out;
    }
    let chunks = meta.chunks();
    let body = j.get(JOURNAL_HEADER as usize..).unwrap_or(&[]);
    let v1 = meta.version == 1;
    let size = if v1 { RECORD_V1 } else { RECORD };
    let mut used = 0usize;
    for r in body.chunks_exact(size) {
        if u32_at(r, size - 4) != Some(crc32c::crc32c(r.get(..size - 4).unwrap_or(&[]))) {
            break;
        }
        let (Some(seq), Some(start), Some(count)) = (u64_at(r, 0), u64_at(r, 8), u64_at(r, 16))
        else {
            break;
        };
        if seq != out.next_seq {
            break;
        }
        let (slot, state) = if v1 {
            (Some(start), r.get(24))
        } else {
            (u64_at(r, 24), r.get(32))
        };
        let state = state.copied().and_then(ChunkState::from_byte);
        let end = start.checked_add(count);
        let slot_end = slot.and_then(|s| s.checked_add(count));
        match (state, end, slot, slot_end) {
            (Some(state), Some(end), Some(slot), Some(slot_end)) if count > 0 && end <= chunks => {
                out.map.set_run(start, end, state, slot);
                if state == ChunkState::Overlay {
                    out.next_slot = out.next_slot.max(slot_end);
                }
            }
            _ => {
                out.problems.push(format!(
                    "journal record {seq} is invalid (chunks {start}+{count} of {chunks})"
                ));
                break;
            }
        }
        out.records += 1;
        out.next_seq = out.next_seq.wrapping_add(1);
        used += size;
    }
    out.ignored_bytes = (body.len() - used) as u64;
    out
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes(s.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    let s = b.get(at..at.checked_add(8)?)?;
    Some(u64::from_le_bytes(s.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(start: u64, end: u64, state: ChunkState, slot: u64) -> Run {
        Run {
            start,
            end,
            state,
            slot,
        }
    }

    fn meta() -> Meta {
        Meta {
            block_size: 512,
            golden_size: 1 << 20,
            chunk_size: 4096,
            golden_id: Some("/srv/golden.img 123".into()),
            generation: 7,
            last_seq: 41,
            next_slot: 12,
            extents: vec![
                run(1, 3, ChunkState::Overlay, 10),
                run(5, 9, ChunkState::Zero, 0),
            ],
            version: VERSION,
        }
    }

    fn rec(start: u64, count: u64, state: ChunkState, slot: u64) -> Rec {
        Rec {
            start,
            count,
            state,
            slot,
        }
    }

    #[test]
    fn meta_roundtrip_and_damage() {
        let m = meta();
        let b = m.encode();
        assert_eq!(Meta::decode(&b).unwrap(), m);
        let none = Meta {
            golden_id: None,
            ..meta()
        };
        assert_eq!(Meta::decode(&none.encode()).unwrap(), none);
        for i in 0..b.len() {
            let mut c = b.clone();
            c[i] ^= 0x40;
            assert!(Meta::decode(&c).is_err(), "flip at {i}");
            assert!(Meta::decode(&b[..i]).is_err());
        }
        // Slots past the counter, or shared by two extents, are refused.
        let past = Meta {
            next_slot: 11,
            ..meta()
        };
        assert!(Meta::decode(&past.encode()).is_err());
        let shared = Meta {
            extents: vec![
                run(1, 3, ChunkState::Overlay, 10),
                run(5, 6, ChunkState::Overlay, 11),
            ],
            ..meta()
        };
        assert!(Meta::decode(&shared.encode()).is_err());
    }

    /// A version 1 snapshot (24-byte extents, no slot counter) as the old code wrote it.
    pub(crate) fn encode_v1(m: &Meta) -> Vec<u8> {
        let id = m.golden_id.as_deref().unwrap_or("").as_bytes();
        let mut b = Vec::new();
        b.extend_from_slice(META_MAGIC);
        b.extend_from_slice(&1u32.to_le_bytes());
        b.extend_from_slice(&m.block_size.to_le_bytes());
        b.extend_from_slice(&m.golden_size.to_le_bytes());
        b.extend_from_slice(&m.chunk_size.to_le_bytes());
        let id_field = m.golden_id.as_ref().map_or(0u32, |_| id.len() as u32 + 1);
        b.extend_from_slice(&id_field.to_le_bytes());
        b.extend_from_slice(&m.generation.to_le_bytes());
        b.extend_from_slice(&m.last_seq.to_le_bytes());
        b.extend_from_slice(&(m.extents.len() as u64).to_le_bytes());
        b.resize(META_FIXED, 0);
        b.extend_from_slice(id);
        for r in &m.extents {
            b.extend_from_slice(&r.start.to_le_bytes());
            b.extend_from_slice(&r.end.to_le_bytes());
            b.push(r.state.to_byte());
            b.extend_from_slice(&[0u8; 7]);
        }
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b
    }

    #[test]
    fn reads_version_1() {
        let old = Meta {
            extents: vec![
                run(1, 3, ChunkState::Overlay, 1),
                run(5, 9, ChunkState::Zero, 0),
            ],
            ..meta()
        };
        let m = Meta::decode(&encode_v1(&old)).unwrap();
        assert_eq!(m.version, 1);
        // Identity slots; the counter starts past the device-sized data file.
        assert_eq!(m.extents, old.extents);
        assert_eq!(m.next_slot, 256);
        let mut j = journal_header(7).to_vec();
        encode_record_v1(42, &rec(20, 2, ChunkState::Overlay, 0), &mut j);
        encode_record_v1(43, &rec(1, 1, ChunkState::Golden, 0), &mut j);
        let r = replay(&m, &j);
        assert_eq!((r.records, r.ignored_bytes, r.next_slot), (2, 0, 256));
        assert_eq!(
            r.map.iter().collect::<Vec<_>>(),
            vec![
                run(2, 3, ChunkState::Overlay, 2),
                run(5, 9, ChunkState::Zero, 0),
                run(20, 22, ChunkState::Overlay, 20),
            ]
        );
        // Written back it is a version 2 snapshot with the same map.
        let again = Meta::decode(&m.encode()).unwrap();
        assert_eq!((again.version, again.next_slot), (VERSION, 256));
        assert_eq!(again.extents, m.extents);
    }

    #[test]
    fn replay_prefix() {
        let m = meta();
        let mut j = journal_header(7).to_vec();
        let recs = [
            rec(3, 2, ChunkState::Overlay, 12),
            rec(1, 1, ChunkState::Golden, 0),
        ];
        for (i, r) in recs.iter().enumerate() {
            encode_record(42 + i as u64, r, &mut j);
        }
        let r = replay(&m, &j);
        assert_eq!(r.records, 2);
        assert_eq!(r.next_seq, 44);
        // Chunk 2 (slot 11) and chunks 3-4 (slots 12-13) are one run; the counter is past 13.
        assert_eq!(
            r.map.iter().collect::<Vec<_>>(),
            vec![
                run(2, 5, ChunkState::Overlay, 11),
                run(5, 9, ChunkState::Zero, 0)
            ]
        );
        assert_eq!(r.next_slot, 14);
        let rl = RECORD as u64;
        // Torn tail: only the first record applies.
        let r = replay(&m, &j[..j.len() - 1]);
        assert_eq!((r.records, r.ignored_bytes), (1, rl - 1));
        // A well-formed record outside the device is reported, not applied.
        let mut bad = journal_header(7).to_vec();
        encode_record(42, &rec(250, 10, ChunkState::Zero, 0), &mut bad);
        let r = replay(&m, &bad);
        assert_eq!((r.records, r.problems.len()), (0, 1));
        // Wrong sequence number: stops there (a record left over from before a compaction).
        let h = JOURNAL_HEADER as usize;
        let skip: Vec<u8> = j[..h].iter().chain(&j[h + RECORD..]).copied().collect();
        let r = replay(&m, &skip);
        assert_eq!((r.records, r.ignored_bytes, r.next_slot), (0, rl, 12));
        // Wrong generation: nothing applies.
        let mut other = journal_header(6).to_vec();
        other.extend_from_slice(&j[h..]);
        let r = replay(&m, &other);
        assert!(r.stale_header);
        assert_eq!(r.map.iter().count(), 2);
    }
}
