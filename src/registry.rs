//! The target registry built from the configuration. To be implemented.
