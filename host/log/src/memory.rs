//! A log in memory: durable as soon as appended (for tests, and to measure the pipeline
//! without the disk).

use crate::{Entry, EventLog, Partition, Position, Result};
use std::sync::Mutex;

#[derive(Default)]
pub struct MemoryLog {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    entries: std::collections::VecDeque<Entry>,
    next: Position,
    bytes: u64,
}

impl MemoryLog {
    pub fn new() -> MemoryLog {
        MemoryLog::default()
    }
}

impl EventLog for MemoryLog {
    fn append(&self, records: &[(Partition, &[u8])]) -> Result<Vec<Position>> {
        let mut state = self.state.lock().expect("memory log");
        let mut positions = Vec::with_capacity(records.len());
        for (partition, payload) in records {
            state.next = state.next.max(1);
            let position = state.next;
            state.next += 1;
            state.bytes += payload.len() as u64;
            state.entries.push_back(Entry { position, partition: *partition, payload: payload.to_vec() });
            positions.push(position);
        }
        Ok(positions)
    }

    fn sync(&self, _position: Position) -> Result<()> {
        Ok(())
    }

    fn read(&self, after: &[(Partition, Position)], visit: &mut dyn FnMut(Entry)) -> Result<()> {
        let entries: Vec<Entry> = {
            let state = self.state.lock().expect("memory log");
            state
                .entries
                .iter()
                .filter(|e| after.iter().any(|(p, pos)| *p == e.partition && e.position > *pos))
                .cloned()
                .collect()
        };
        entries.into_iter().for_each(visit);
        Ok(())
    }

    fn truncate_before(&self, position: Position) -> Result<u64> {
        let mut state = self.state.lock().expect("memory log");
        let mut freed = 0;
        while state.entries.front().is_some_and(|e| e.position < position) {
            let entry = state.entries.pop_front().expect("checked above");
            freed += entry.payload.len() as u64;
        }
        state.bytes -= freed;
        Ok(freed)
    }

    fn seal(&self) -> Result<()> {
        Ok(())
    }

    fn next_position(&self) -> Position {
        self.state.lock().expect("memory log").next.max(1)
    }

    fn continue_after(&self, position: Position) {
        let mut state = self.state.lock().expect("memory log");
        state.next = state.next.max(position + 1);
    }

    fn size_bytes(&self) -> u64 {
        self.state.lock().expect("memory log").bytes
    }
}
