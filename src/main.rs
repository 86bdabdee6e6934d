//! The `ponder` binary's entry point: [`ponder::cli::main`] parses the
//! command line and dispatches to the subcommand (`serve`, `generate`,
//! `bench`, `eval`, `calibrate`, `arith`); its exit status is the process's.
//! Everything else lives in the library crate.

fn main() -> std::process::ExitCode {
    ponder::cli::main()
}
