//! `ferry generate`: the man pages and shell completions, made from the CLI's own definition so
//! they never drift from it. The Debian package (`make deb`, scripts/build-deb.sh) installs
//! what this writes. Hidden from `--help`: it is for packagers.

use std::path::Path;
use std::process::ExitCode;

use clap::CommandFactory;
use clap_complete::Shell;

use crate::cli::{Cli, GenerateArgs};
use crate::config::{Error, Result};

/// Writes `ferry.1` and one page per command (`ferry-serve.1`, ...) into `dir`.
fn man_pages(dir: &Path) -> Result<()> {
    let write = |name: &str, cmd: clap::Command| -> Result<()> {
        let mut out = Vec::new();
        clap_mangen::Man::new(cmd)
            .render(&mut out)
            .map_err(|e| Error::Runtime(format!("cannot render the {name} man page: {e}")))?;
        let path = dir.join(format!("{name}.1"));
        std::fs::write(&path, out)
            .map_err(|e| Error::Runtime(format!("cannot write {}: {e}", path.display())))
    };
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::Runtime(format!("cannot create {}: {e}", dir.display())))?;
    let mut cli = Cli::command();
    cli.build();
    for sub in cli
        .get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
    {
        let name = format!("ferry-{}", sub.get_name());
        // A page's title and NAME line use the command's own name: give it the full one.
        write(&name, sub.clone().name(name.clone()))?;
    }
    write("ferry", cli)
}

/// Writes the completion script for `shell` into `dir`, under the name that shell looks for.
fn completions(shell: Shell, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::Runtime(format!("cannot create {}: {e}", dir.display())))?;
    clap_complete::generate_to(shell, &mut Cli::command(), "ferry", dir)
        .map(|_| ())
        .map_err(|e| Error::Runtime(format!("cannot write {shell} completions: {e}")))
}

/// `ferry generate man DIR` or `ferry generate completions SHELL DIR`.
pub fn generate(a: GenerateArgs) -> Result<ExitCode> {
    match a.what.as_str() {
        "man" => man_pages(&a.dir)?,
        "bash" | "zsh" | "fish" => completions(a.what.parse().unwrap_or(Shell::Bash), &a.dir)?,
        other => {
            return Err(Error::Usage(format!(
                "generate {other}: give man, bash, zsh or fish"
            )))
        }
    }
    Ok(ExitCode::SUCCESS)
}
