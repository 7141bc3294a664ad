//! The embedded log: segment files in one directory, named by the first position they hold.
//! A record is `length (u32) · crc32 (u32) · position (u64) · partition (u16) · payload`, all
//! little-endian, the checksum covering position, partition and payload. Appends go to the
//! last segment; a sync is one `fdatasync` of it, shared by every caller waiting (group
//! commit), and a segment is synced once more when the next one starts. On open, a record cut
//! short or failing its checksum at the end of the last segment (a write torn by a crash) is
//! cut off, with a warning saying how many bytes went.

use crate::{Entry, EventLog, LogError, Partition, Position, Result};
use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};

const HEADER: usize = 18;
/// Largest payload accepted: a record holds one request's events for one partition.
const MAX_PAYLOAD: usize = 64 << 20;
/// A segment is closed and a new one started once it holds this many bytes.
pub(crate) const SEGMENT_BYTES: u64 = 64 << 20;
/// A segment whose records are all materialized is closed (and then deleted) once it holds
/// this many bytes.
const ROLL_WHEN_DONE_BYTES: u64 = 1 << 20;

pub struct SegmentLog {
    dir: PathBuf,
    segment_bytes: u64,
    writer: Mutex<Writer>,
    sync: Mutex<SyncState>,
    synced: Condvar,
}

struct Writer {
    /// Oldest first; the last one is being appended to.
    segments: VecDeque<Segment>,
    active: Arc<File>,
    next: Position,
    buffer: Vec<u8>,
}

struct Segment {
    first: Position,
    path: PathBuf,
    bytes: u64,
}

#[derive(Default)]
struct SyncState {
    synced: Position,
    syncing: bool,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> LogError + '_ {
    move |source| LogError::Io { path: path.display().to_string(), source }
}

fn segment_path(dir: &Path, first: Position) -> PathBuf {
    dir.join(format!("{first:020}.seg"))
}

fn checksum(position: Position, partition: Partition, payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&position.to_le_bytes());
    hasher.update(&partition.to_le_bytes());
    hasher.update(payload);
    hasher.finalize()
}

fn encode(buffer: &mut Vec<u8>, position: Position, partition: Partition, payload: &[u8]) {
    buffer.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    buffer.extend_from_slice(&checksum(position, partition, payload).to_le_bytes());
    buffer.extend_from_slice(&position.to_le_bytes());
    buffer.extend_from_slice(&partition.to_le_bytes());
    buffer.extend_from_slice(payload);
}

/// Why the bytes at a record's place are not a whole record.
enum Damage {
    /// The file ends inside the record.
    Short,
    Invalid(String),
}

/// Reads the record at the reader's place; `Ok(None)` at the end of the file.
fn decode(reader: &mut impl Read) -> std::io::Result<Option<std::result::Result<Entry, Damage>>> {
    let mut header = [0u8; HEADER];
    let mut filled = 0;
    while filled < HEADER {
        match reader.read(&mut header[filled..])? {
            0 if filled == 0 => return Ok(None),
            0 => return Ok(Some(Err(Damage::Short))),
            n => filled += n,
        }
    }
    let length = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes"));
    let position = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
    let partition = u16::from_le_bytes(header[16..18].try_into().expect("2 bytes"));
    if length > MAX_PAYLOAD {
        return Ok(Some(Err(Damage::Invalid(format!("length {length} is past the limit")))));
    }
    let mut payload = vec![0u8; length];
    let mut filled = 0;
    while filled < length {
        match reader.read(&mut payload[filled..])? {
            0 => return Ok(Some(Err(Damage::Short))),
            n => filled += n,
        }
    }
    if checksum(position, partition, &payload) != crc {
        return Ok(Some(Err(Damage::Invalid("checksum mismatch".into()))));
    }
    Ok(Some(Ok(Entry { position, partition, payload })))
}

/// What [`SegmentLog::check`] found.
#[derive(Debug, Default)]
pub struct LogCheck {
    pub segments: usize,
    /// Whole records, and their bytes.
    pub records: u64,
    pub bytes: u64,
    /// A last record not whole (segment, bytes, why): a write torn by a crash, cut at the next
    /// start.
    pub torn_tail: Option<(String, u64, String)>,
    /// Records that fail their checksum before the end: damage, not a torn write. The rest of
    /// each such segment is not read.
    pub damaged: Vec<LogError>,
}

impl SegmentLog {
    /// Opens the log in `dir`, creating it if needed, and cuts a torn tail.
    pub fn open(dir: &Path) -> Result<SegmentLog> {
        SegmentLog::with_segment_bytes(dir, SEGMENT_BYTES)
    }

    pub fn with_segment_bytes(dir: &Path, segment_bytes: u64) -> Result<SegmentLog> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let mut firsts = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(io(dir))? {
            let name = entry.map_err(io(dir))?.file_name();
            let name = name.to_string_lossy();
            if let Some(first) = name.strip_suffix(".seg").and_then(|n| n.parse::<Position>().ok()) {
                firsts.push(first);
            }
        }
        firsts.sort_unstable();
        let mut segments = VecDeque::new();
        for first in &firsts {
            let path = segment_path(dir, *first);
            let bytes = std::fs::metadata(&path).map_err(io(&path))?.len();
            segments.push_back(Segment { first: *first, path, bytes });
        }
        let next = match segments.back_mut() {
            Some(last) => Self::recover_tail(last)?,
            None => {
                let path = segment_path(dir, 1);
                File::create(&path).map_err(io(&path))?;
                sync_dir(dir)?;
                segments.push_back(Segment { first: 1, path, bytes: 0 });
                1
            }
        };
        let last = segments.back().expect("one segment at least");
        let active = OpenOptions::new().append(true).open(&last.path).map_err(io(&last.path))?;
        Ok(SegmentLog {
            dir: dir.to_path_buf(),
            segment_bytes,
            writer: Mutex::new(Writer { segments, active: Arc::new(active), next, buffer: Vec::new() }),
            sync: Mutex::new(SyncState { synced: next - 1, syncing: false }),
            synced: Condvar::new(),
        })
    }

    /// Reads every record of the log in `dir` without changing anything, checking each one's
    /// checksum: what `starling check` reports.
    pub fn check(dir: &Path) -> Result<LogCheck> {
        let mut paths: Vec<(Position, PathBuf)> = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(io(dir))? {
            let name = entry.map_err(io(dir))?.file_name();
            if let Some(first) = name.to_string_lossy().strip_suffix(".seg").and_then(|n| n.parse().ok()) {
                paths.push((first, segment_path(dir, first)));
            }
        }
        paths.sort();
        let mut report = LogCheck { segments: paths.len(), ..LogCheck::default() };
        for (i, (_, path)) in paths.iter().enumerate() {
            let bytes = std::fs::metadata(path).map_err(io(path))?.len();
            let mut reader = BufReader::new(File::open(path).map_err(io(path))?);
            let mut offset = 0u64;
            while let Some(record) = decode(&mut reader).map_err(io(path))? {
                match record {
                    Ok(entry) => {
                        offset += (HEADER + entry.payload.len()) as u64;
                        report.records += 1;
                    }
                    Err(damage) => {
                        let reason = match damage {
                            Damage::Short => "cut short".to_string(),
                            Damage::Invalid(reason) => reason,
                        };
                        if i + 1 == paths.len() {
                            report.torn_tail = Some((path.display().to_string(), bytes - offset, reason));
                        } else {
                            report.damaged.push(LogError::Damaged { path: path.display().to_string(), offset, reason });
                        }
                        break;
                    }
                }
            }
            report.bytes += offset;
        }
        Ok(report)
    }

    /// Validates the last segment, cutting it at the first record that is not whole; returns
    /// the next position.
    fn recover_tail(last: &mut Segment) -> Result<Position> {
        let file = File::open(&last.path).map_err(io(&last.path))?;
        let mut reader = BufReader::new(file);
        let (mut offset, mut next) = (0u64, last.first);
        loop {
            match decode(&mut reader).map_err(io(&last.path))? {
                None => break,
                Some(Ok(entry)) => {
                    offset += (HEADER + entry.payload.len()) as u64;
                    next = entry.position + 1;
                }
                Some(Err(damage)) => {
                    let reason = match damage {
                        Damage::Short => "cut short".to_string(),
                        Damage::Invalid(reason) => reason,
                    };
                    let file = OpenOptions::new().write(true).open(&last.path).map_err(io(&last.path))?;
                    file.set_len(offset).map_err(io(&last.path))?;
                    file.sync_all().map_err(io(&last.path))?;
                    tracing::warn!(
                        segment = %last.path.display(),
                        offset,
                        cut_bytes = last.bytes - offset,
                        "event log: the last record was not whole ({reason}); cut it off"
                    );
                    break;
                }
            }
        }
        last.bytes = offset;
        Ok(next)
    }

    /// Closes the active segment (synced) and starts a new one at the next position.
    fn roll(&self, writer: &mut Writer) -> Result<()> {
        let old = writer.segments.back().expect("one segment at least");
        writer.active.sync_data().map_err(io(&old.path))?;
        let path = segment_path(&self.dir, writer.next);
        let file = OpenOptions::new().create(true).append(true).open(&path).map_err(io(&path))?;
        sync_dir(&self.dir)?;
        writer.segments.push_back(Segment { first: writer.next, path, bytes: 0 });
        writer.active = Arc::new(file);
        Ok(())
    }
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

impl EventLog for SegmentLog {
    fn append(&self, records: &[(Partition, &[u8])]) -> Result<Vec<Position>> {
        if let Some((_, payload)) = records.iter().find(|(_, p)| p.len() > MAX_PAYLOAD) {
            return Err(LogError::TooLarge(payload.len()));
        }
        let mut writer = self.writer.lock().expect("log writer");
        let writer = &mut *writer;
        writer.buffer.clear();
        let mut positions = Vec::with_capacity(records.len());
        for (partition, payload) in records {
            encode(&mut writer.buffer, writer.next, *partition, payload);
            positions.push(writer.next);
            writer.next += 1;
        }
        let segment = writer.segments.back_mut().expect("one segment at least");
        if let Err(e) = (&*writer.active).write_all(&writer.buffer) {
            // Nothing after a failed write is trusted: take back the positions and the bytes.
            writer.next -= records.len() as u64;
            let _ = writer.active.set_len(segment.bytes);
            return Err(io(&segment.path)(e));
        }
        segment.bytes += writer.buffer.len() as u64;
        if segment.bytes >= self.segment_bytes {
            self.roll(writer)?;
        }
        Ok(positions)
    }

    fn sync(&self, position: Position) -> Result<()> {
        let mut state = self.sync.lock().expect("log sync");
        loop {
            if state.synced >= position {
                return Ok(());
            }
            if state.syncing {
                state = self.synced.wait(state).expect("log sync");
                continue;
            }
            state.syncing = true;
            drop(state);
            // Earlier segments were synced when the next one started.
            let (file, upto, path) = {
                let writer = self.writer.lock().expect("log writer");
                let path = writer.segments.back().expect("one segment at least").path.clone();
                (writer.active.clone(), writer.next - 1, path)
            };
            let result = file.sync_data();
            state = self.sync.lock().expect("log sync");
            state.syncing = false;
            self.synced.notify_all();
            match result {
                Ok(()) => state.synced = state.synced.max(upto),
                Err(e) => return Err(io(&path)(e)),
            }
        }
    }

    fn read(&self, after: &[(Partition, Position)], visit: &mut dyn FnMut(Entry)) -> Result<()> {
        let Some(from) = after.iter().map(|(_, p)| *p).min() else { return Ok(()) };
        let mut wanted = [None; crate::PARTITIONS as usize];
        for (partition, position) in after {
            wanted[*partition as usize] = Some(*position);
        }
        // The segments to read and how much of each was written when the read began.
        let segments: Vec<(PathBuf, u64)> = {
            let writer = self.writer.lock().expect("log writer");
            let s = &writer.segments;
            (0..s.len())
                .filter(|i| s.get(i + 1).is_none_or(|n| n.first > from + 1))
                .map(|i| (s[i].path.clone(), s[i].bytes))
                .collect()
        };
        for (path, bytes) in segments {
            let file = File::open(&path).map_err(io(&path))?;
            let mut reader = BufReader::new(file.take(bytes));
            let mut offset = 0u64;
            while let Some(record) = decode(&mut reader).map_err(io(&path))? {
                let entry = record.map_err(|damage| LogError::Damaged {
                    path: path.display().to_string(),
                    offset,
                    reason: match damage {
                        Damage::Short => "cut short".into(),
                        Damage::Invalid(reason) => reason,
                    },
                })?;
                offset += (HEADER + entry.payload.len()) as u64;
                if wanted.get(entry.partition as usize).copied().flatten().is_some_and(|after| entry.position > after) {
                    visit(entry);
                }
            }
        }
        Ok(())
    }

    fn truncate_before(&self, position: Position) -> Result<u64> {
        let mut writer = self.writer.lock().expect("log writer");
        // An active segment past a small size that holds only records before `position` is
        // closed, so that it can go too (rolling a tiny one at every checkpoint would cost a
        // file and two directory syncs each time for nothing; `seal` closes any).
        let active = writer.segments.back().expect("one segment at least");
        if active.bytes >= ROLL_WHEN_DONE_BYTES && writer.next <= position {
            self.roll(&mut writer)?;
        }
        let mut freed = 0;
        while writer.segments.len() > 1 && writer.segments[1].first <= position {
            let old = writer.segments.pop_front().expect("checked above");
            std::fs::remove_file(&old.path).map_err(io(&old.path))?;
            freed += old.bytes;
        }
        if freed > 0 {
            sync_dir(&self.dir)?;
        }
        Ok(freed)
    }

    fn seal(&self) -> Result<()> {
        let mut writer = self.writer.lock().expect("log writer");
        match writer.segments.back().expect("one segment at least").bytes {
            0 => Ok(()),
            _ => self.roll(&mut writer),
        }
    }

    fn next_position(&self) -> Position {
        self.writer.lock().expect("log writer").next
    }

    fn continue_after(&self, position: Position) {
        let mut writer = self.writer.lock().expect("log writer");
        writer.next = writer.next.max(position + 1);
    }

    fn size_bytes(&self) -> u64 {
        self.writer.lock().expect("log writer").segments.iter().map(|s| s.bytes).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(log: &dyn EventLog) -> Vec<Entry> {
        let mut entries = Vec::new();
        let after: Vec<_> = (0..crate::PARTITIONS).map(|p| (p, 0)).collect();
        log.read(&after, &mut |e| entries.push(e)).unwrap();
        entries
    }

    #[test]
    fn records_survive_reopening_in_order_per_partition() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = SegmentLog::with_segment_bytes(dir.path(), 100).unwrap();
            let positions = log.append(&[(3, b"a"), (5, b"b"), (3, b"c")]).unwrap();
            assert_eq!(positions, vec![1, 2, 3]);
            log.sync(3).unwrap();
            for i in 0..20u8 {
                log.append(&[(i as u16 % 2, &[i; 30])]).unwrap();
            }
            log.sync(log.next_position() - 1).unwrap();
        }
        let log = SegmentLog::with_segment_bytes(dir.path(), 100).unwrap();
        assert_eq!(log.next_position(), 24);
        let entries = all(&log);
        assert_eq!(entries.len(), 23);
        assert_eq!(entries[0], Entry { position: 1, partition: 3, payload: b"a".to_vec() });
        let mut only_three = Vec::new();
        log.read(&[(3, 1)], &mut |e| only_three.push(e.payload)).unwrap();
        assert_eq!(only_three, vec![b"c".to_vec()]);
        assert!(std::fs::read_dir(dir.path()).unwrap().count() > 3, "segments rolled");
    }

    #[test]
    fn a_torn_tail_is_cut_at_the_last_whole_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = {
            let log = SegmentLog::open(dir.path()).unwrap();
            log.append(&[(1, b"whole"), (1, b"torn record")]).unwrap();
            log.sync(2).unwrap();
            segment_path(dir.path(), 1)
        };
        let len = std::fs::metadata(&path).unwrap().len();
        OpenOptions::new().write(true).open(&path).unwrap().set_len(len - 4).unwrap();
        let log = SegmentLog::open(dir.path()).unwrap();
        assert_eq!(all(&log).iter().map(|e| e.payload.clone()).collect::<Vec<_>>(), vec![b"whole".to_vec()]);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), (HEADER + 5) as u64);
        // The cut record's position is handed out again: it was never acknowledged.
        assert_eq!(log.append(&[(1, b"next")]).unwrap(), vec![2]);
    }

    #[test]
    fn a_flipped_byte_fails_the_checksum() {
        let dir = tempfile::tempdir().unwrap();
        let path = {
            let log = SegmentLog::open(dir.path()).unwrap();
            log.append(&[(1, b"first"), (1, b"second")]).unwrap();
            segment_path(dir.path(), 1)
        };
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        let log = SegmentLog::open(dir.path()).unwrap();
        assert_eq!(all(&log).len(), 1);
    }

    #[test]
    fn truncation_removes_whole_segments_before_the_position() {
        let dir = tempfile::tempdir().unwrap();
        let log = SegmentLog::with_segment_bytes(dir.path(), 64).unwrap();
        for i in 0..10u8 {
            log.append(&[(0, &[i; 50])]).unwrap();
        }
        let before = log.size_bytes();
        assert!(log.truncate_before(6).unwrap() > 0);
        assert!(log.size_bytes() < before);
        let positions: Vec<_> = all(&log).iter().map(|e| e.position).collect();
        assert_eq!(positions, (6..=10).collect::<Vec<_>>());
        // Everything before the end: a sealed active segment goes too.
        log.append(&[(0, b"y")]).unwrap();
        log.seal().unwrap();
        log.truncate_before(12).unwrap();
        assert_eq!(log.size_bytes(), 0);
        assert_eq!(log.append(&[(0, b"x")]).unwrap(), vec![12]);
    }

    #[test]
    fn positions_continue_after_a_recorded_one() {
        let dir = tempfile::tempdir().unwrap();
        let log = SegmentLog::open(dir.path()).unwrap();
        log.continue_after(41);
        assert_eq!(log.append(&[(0, b"x")]).unwrap(), vec![42]);
        drop(log);
        assert_eq!(SegmentLog::open(dir.path()).unwrap().next_position(), 43);
    }

    #[test]
    fn concurrent_syncs_share_fsyncs() {
        let dir = tempfile::tempdir().unwrap();
        let log = Arc::new(SegmentLog::open(dir.path()).unwrap());
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let log = log.clone();
                std::thread::spawn(move || {
                    for i in 0..200u32 {
                        let payload = format!("{t}-{i}");
                        let position = log.append(&[(t, payload.as_bytes())]).unwrap()[0];
                        log.sync(position).unwrap();
                    }
                })
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        assert_eq!(all(&*log).len(), 800);
    }

    #[test]
    fn check_reads_every_record_and_tells_damage_from_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = SegmentLog::with_segment_bytes(dir.path(), 60).unwrap();
            for i in 0..6u8 {
                let position = log.append(&[(1, &[i; 20])]).unwrap()[0];
                log.sync(position).unwrap();
            }
        }
        let healthy = SegmentLog::check(dir.path()).unwrap();
        assert_eq!((healthy.records, healthy.damaged.len(), healthy.torn_tail.is_none()), (6, 0, true));
        assert!(healthy.segments >= 3, "{healthy:?}");

        let mut segments: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().path()).collect();
        segments.sort_by_key(|p| p.file_stem().unwrap().to_string_lossy().parse::<u64>().unwrap());
        if std::fs::metadata(segments.last().unwrap()).unwrap().len() == 0 {
            std::fs::remove_file(segments.pop().unwrap()).unwrap();
        }
        // A flipped payload byte in the first segment; the last segment's last record cut short.
        let mut first = std::fs::read(&segments[0]).unwrap();
        first[HEADER + 3] ^= 0xff;
        std::fs::write(&segments[0], first).unwrap();
        let last = segments.last().unwrap();
        let len = std::fs::metadata(last).unwrap().len();
        std::fs::OpenOptions::new().write(true).open(last).unwrap().set_len(len - 5).unwrap();

        let report = SegmentLog::check(dir.path()).unwrap();
        assert_eq!(report.damaged.len(), 1);
        assert!(report.damaged[0].to_string().contains("damaged record at byte 0: checksum mismatch"), "{report:?}");
        let (_, cut, reason) = report.torn_tail.as_ref().unwrap();
        let record = HEADER as u64 + 20;
        assert_eq!((*cut, reason.as_str()), (record - 5, "cut short"));
    }
}
