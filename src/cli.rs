//! Command line (clap). To be implemented.
pub fn main() -> std::process::ExitCode {
    todo!()
}
