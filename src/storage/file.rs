//! Raw image file backend (to be implemented): pread/pwrite, fdatasync, fallocate punch hole,
//! SEEK_DATA/SEEK_HOLE.
/// A raw image file.
pub struct FileStore {
    _private: (),
}
