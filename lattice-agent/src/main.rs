use std::process::ExitCode;

use clap::Parser;
use lattice_agent::{
    app,
    cli::Cli,
    config::{self, AgentConfig},
    self_check, telemetry,
};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match config::telemetry(&cli.telemetry) {
        Ok(cfg) => telemetry::init(cfg),
        Err(e) => {
            eprintln!("lattice-agent: error: {}", lattice_agent::error_chain(&e));
            return ExitCode::from(2);
        }
    }
    let result = config::agent(&cli.command)
        .map_err(anyhow::Error::from)
        .and_then(|cfg| match cfg {
            AgentConfig::SelfCheck => self_check::report().map_err(Into::into),
            cfg => app::build(cfg)?.serve(),
        });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` prints the whole cause chain on one line.
            tracing::error!("lattice-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}
