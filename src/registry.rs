//! The target registry built from the configuration (to be implemented): targets, their
//! LUN tables, access lists and CHAP, as the login layer's `Directory`.
use crate::scsi::LunTable;
use std::sync::Arc;

pub struct Registry {
    _private: (),
}

impl Registry {
    /// The LUNs of `target`, if it exists.
    pub fn luns(&self, target: &str) -> Option<Arc<LunTable>> {
        let _ = target;
        todo!()
    }
}
