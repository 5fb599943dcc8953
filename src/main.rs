fn main() -> std::process::ExitCode {
    diskless::cli::main()
}
