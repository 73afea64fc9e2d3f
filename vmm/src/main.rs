//! `ferry`: one host process serving a VM's network and file sharing over vhost-user.

use std::process::ExitCode;

use clap::Parser;

mod api;
mod cli;
mod config;
mod ctl;
mod devices;
mod mount;
mod portd;
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
        cli::Command::Ctl(a) => ctl::ctl(a),
        cli::Command::Portd(a) => portd::portd(a),
    };
    match res {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ferry: {e}");
            e.exit_code()
        }
    }
}
