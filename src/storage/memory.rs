//! In-memory backend for tests (to be implemented).
/// A block store held in memory.
pub struct MemStore {
    _private: (),
}
