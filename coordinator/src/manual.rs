//! `coordinator completions SHELL` and `coordinator man`: generated from the same clap
//! definition that parses the command line (with the exit codes every `--help` shows), so they
//! cannot drift from it.

use std::path::Path;

use crate::cli::with_exit_codes;
use anyhow::Context;

/// The completion script for `shell` on stdout.
pub fn completions<C: clap::CommandFactory>(shell: clap_complete::Shell) -> anyhow::Result<()> {
    let mut cmd = with_exit_codes(C::command());
    clap_complete::generate(shell, &mut cmd, "coordinator", &mut std::io::stdout());
    Ok(())
}

/// The top page on stdout, or every command's page written into `dir`.
pub fn man<C: clap::CommandFactory>(dir: Option<&Path>) -> anyhow::Result<()> {
    let cmd = with_exit_codes(C::command());
    match dir {
        None => clap_mangen::Man::new(cmd)
            .render(&mut std::io::stdout())
            .context("writing the manual page"),
        Some(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            clap_mangen::generate_to(cmd, dir)
                .with_context(|| format!("writing manual pages into {}", dir.display()))
        }
    }
}
