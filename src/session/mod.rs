//! Sessions and connections (tokio). To be implemented.
