fn main() -> std::process::ExitCode {
    ponder::cli::main()
}
