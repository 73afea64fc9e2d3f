//! `ferry`: one host process serving a VM's network and file sharing over vhost-user.

use std::process::ExitCode;

use clap::Parser;

mod api;
mod cli;
mod config;
mod ctl;
mod devices;
mod generate;
mod listen;
mod mount;
mod portd;
mod run;
mod runtime_dir;
mod sandbox;
mod serve;
mod shares;
mod signals;
mod virtiofsd;

fn main() -> ExitCode {
    // Each guest TCP connection has multi-MiB stack buffers (the window the guest sees). Served
    // by mmap they cost only the pages a connection really uses, and go back to the system when
    // it closes; glibc's adaptive threshold would move them to the heap after the first free,
    // where every new connection pays a memset of the whole buffer and freed memory stays
    // resident.
    // SAFETY: mallopt only changes allocator tuning; it is called before any other thread runs.
    unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024) };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    // As `ferry-virtiofsd` (libvirt's <binary> names one program, with no arguments).
    let argv: Vec<String> = std::env::args().collect();
    if let Some(rest) = virtiofsd::as_alias(&argv) {
        return match virtiofsd::run(&rest) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("ferry virtiofsd: {e}");
                e.exit_code()
            }
        };
    }
    // As `ferry-vhost-user-net` (the net descriptor's binary): `ferry serve`.
    let args = if std::path::Path::new(&argv[0])
        .file_name()
        .is_some_and(|n| n.to_string_lossy().ends_with("vhost-user-net"))
    {
        cli::Cli::parse_from(
            std::iter::once("ferry".to_string())
                .chain(std::iter::once("serve".to_string()))
                .chain(argv[1..].iter().cloned()),
        )
    } else {
        cli::Cli::parse()
    };
    let res = match args.command {
        cli::Command::Serve(a) if a.print_capabilities => {
            // vhost-user.rst, "Backend program conventions": the capabilities as JSON, and
            // nothing else done. The net device has no optional features to list.
            println!(r#"{{"type": "net", "features": []}}"#);
            Ok(ExitCode::SUCCESS)
        }
        cli::Command::Serve(a) => config::ServeConfig::try_from(*a).and_then(serve::serve),
        cli::Command::Run(a) => config::RunConfig::try_from(a).and_then(run::run),
        cli::Command::Mount(a) => mount::mount(a),
        cli::Command::Ctl(a) => ctl::ctl(a),
        cli::Command::Portd(a) => portd::portd(a),
        cli::Command::Virtiofsd(a) => virtiofsd::run(&a.args),
        cli::Command::Generate(a) => generate::generate(a),
    };
    match res {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ferry: {e}");
            e.exit_code()
        }
    }
}
