//! `ferry`: one host process serving a VM's network and file sharing over vhost-user.

use std::process::ExitCode;

use clap::Parser;

mod cli;
mod config;
mod devices;
mod mount;
mod run;
mod serve;
mod signals;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args = cli::Cli::parse();
    let res = match args.command {
        cli::Command::Serve(a) => config::ServeConfig::try_from(a).and_then(serve::serve),
        cli::Command::Run(a) => config::RunConfig::try_from(a).and_then(run::run),
        cli::Command::Mount(a) => mount::mount(a),
    };
    match res {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ferry: {e}");
            e.exit_code()
        }
    }
}
