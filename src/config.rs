//! targets.yaml (serde_yaml). To be implemented.
