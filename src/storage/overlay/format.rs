//! On-disk formats of an overlay directory (see docs/overlays.md): the snapshot file
//! (`overlay.meta`), the journal (`overlay.journal`) and their replay. Pure functions over
//! bytes, so `Overlay::open` and the offline `check` share one parser. Every length and
//! offset read from disk is checked: a damaged file yields an error, never a panic.
use super::extents::{ChunkState, ExtentMap};

pub(crate) const META_MAGIC: &[u8; 8] = b"DLOVMETA";
pub(crate) const JOURNAL_MAGIC: &[u8; 8] = b"DLOVJRNL";
pub(crate) const VERSION: u32 = 1;
/// Journal header and record size in bytes.
pub(crate) const JOURNAL_HEADER: u64 = 32;
pub(crate) const RECORD: usize = 32;
/// Fixed part of the snapshot header, before the id string.
const META_FIXED: usize = 64;
/// One extent in the snapshot: start u64, end u64, state u8, 7 bytes of padding.
const EXTENT: usize = 24;
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
    pub extents: Vec<(u64, u64, ChunkState)>,
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
        b.resize(META_FIXED, 0);
        b.extend_from_slice(id);
        for &(s, e, st) in &self.extents {
            b.extend_from_slice(&s.to_le_bytes());
            b.extend_from_slice(&e.to_le_bytes());
            b.push(st.to_byte());
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
        if version != VERSION {
            return Err(format!("unsupported snapshot version {version}"));
        }
        let block_size = u32_at(body, 12).ok_or_else(bad)?;
        let golden_size = u64_at(body, 16).ok_or_else(bad)?;
        let chunk_size = u32_at(body, 24).ok_or_else(bad)?;
        let id_field = u32_at(body, 28).ok_or_else(bad)? as usize;
        let generation = u64_at(body, 32).ok_or_else(bad)?;
        let last_seq = u64_at(body, 40).ok_or_else(bad)?;
        let n_ext = u64_at(body, 48).ok_or_else(bad)?;
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
        if u64::try_from(ext_bytes.len()).ok() != n_ext.checked_mul(EXTENT as u64) {
            return Err("snapshot extent count does not match its length".into());
        }
        let chunks = golden_size.div_ceil(u64::from(chunk_size));
        let mut extents = Vec::new();
        let mut prev_end = 0;
        for e in ext_bytes.chunks_exact(EXTENT) {
            let (s, end) = (u64_at(e, 0).ok_or_else(bad)?, u64_at(e, 8).ok_or_else(bad)?);
            let st = e
                .get(16)
                .copied()
                .and_then(ChunkState::from_byte)
                .ok_or_else(|| "snapshot extent has a bad state".to_string())?;
            if s < prev_end || s >= end || end > chunks || st == ChunkState::Golden {
                return Err(format!("snapshot extent {s}..{end} out of order or range"));
            }
            prev_end = end;
            extents.push((s, end, st));
        }
        Ok(Meta {
            block_size,
            golden_size,
            chunk_size,
            golden_id,
            generation,
            last_seq,
            extents,
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

/// One state change: chunks `[start, start + count)` became `state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Rec {
    pub start: u64,
    pub count: u64,
    pub state: ChunkState,
}

pub(crate) fn encode_record(seq: u64, r: &Rec, out: &mut Vec<u8>) {
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
    for &(s, e, st) in &meta.extents {
        map.set(s, e, st);
    }
    let mut out = Replay {
        map,
        records: 0,
        next_seq: meta.last_seq.wrapping_add(1),
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
    let mut used = 0usize;
    for r in body.chunks_exact(RECORD) {
        if u32_at(r, 28) != Some(crc32c::crc32c(r.get(..28).unwrap_or(&[]))) {
            break;
        }
        let (Some(seq), Some(start), Some(count)) = (u64_at(r, 0), u64_at(r, 8), u64_at(r, 16))
        else {
            break;
        };
        if seq != out.next_seq {
            break;
        }
        let state = r.get(24).copied().and_then(ChunkState::from_byte);
        let end = start.checked_add(count);
        match (state, end) {
            (Some(state), Some(end)) if count > 0 && end <= chunks => {
                out.map.set(start, end, state);
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
        used += RECORD;
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

    fn meta() -> Meta {
        Meta {
            block_size: 512,
            golden_size: 1 << 20,
            chunk_size: 4096,
            golden_id: Some("/srv/golden.img 123".into()),
            generation: 7,
            last_seq: 41,
            extents: vec![(1, 3, ChunkState::Overlay), (5, 9, ChunkState::Zero)],
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
    }

    #[test]
    fn replay_prefix() {
        let m = meta();
        let mut j = journal_header(7).to_vec();
        let recs = [
            Rec {
                start: 3,
                count: 2,
                state: ChunkState::Overlay,
            },
            Rec {
                start: 1,
                count: 1,
                state: ChunkState::Golden,
            },
        ];
        for (i, r) in recs.iter().enumerate() {
            encode_record(42 + i as u64, r, &mut j);
        }
        let r = replay(&m, &j);
        assert_eq!(r.records, 2);
        assert_eq!(r.next_seq, 44);
        assert_eq!(
            r.map.iter().collect::<Vec<_>>(),
            vec![(2, 5, ChunkState::Overlay), (5, 9, ChunkState::Zero)]
        );
        // Torn tail: only the first record applies.
        let r = replay(&m, &j[..j.len() - 1]);
        assert_eq!((r.records, r.ignored_bytes), (1, 31));
        // A well-formed record outside the device is reported, not applied.
        let mut bad = journal_header(7).to_vec();
        let far = Rec {
            start: 250,
            count: 10,
            state: ChunkState::Zero,
        };
        encode_record(42, &far, &mut bad);
        let r = replay(&m, &bad);
        assert_eq!((r.records, r.problems.len()), (0, 1));
        // Wrong sequence number: stops there (a record left over from before a compaction).
        let r = replay(
            &m,
            &j[..32].iter().chain(&j[64..]).copied().collect::<Vec<_>>(),
        );
        assert_eq!((r.records, r.ignored_bytes), (0, 32));
        // Wrong generation: nothing applies.
        let mut other = journal_header(6).to_vec();
        other.extend_from_slice(&j[32..]);
        let r = replay(&m, &other);
        assert!(r.stale_header);
        assert_eq!(r.map.iter().count(), 2);
    }
}
