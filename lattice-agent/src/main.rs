use std::process::ExitCode;

use clap::Parser;
use lattice_agent::{
    cli::{Cli, Command},
    mode, telemetry,
};

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = telemetry::init(&cli.telemetry) {
        eprintln!("lattice-agent: error: {e}");
        return ExitCode::from(2);
    }
    let result = match &cli.command {
        Command::Run(args) => mode::run(args),
        Command::Sidecar(args) => mode::sidecar(args),
        Command::Node(args) => mode::node(args),
        Command::SelfCheck => lattice_agent::self_check::report().map_err(Into::into),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` prints the whole cause chain on one line.
            tracing::error!("lattice-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}
