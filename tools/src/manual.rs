//! `userptr completions SHELL` and `userptr man`: generated from the clap definitions
//! (clap_complete, clap_mangen), so they never drift from `--help`.

use std::io::Write;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct CompletionArgs {
    /// The shell.
    #[arg(value_enum)]
    shell: clap_complete::Shell,
}

#[derive(clap::Args)]
pub struct ManArgs {
    /// Write userptr.1 and userptr-SUBCOMMAND.1 into DIR instead of printing userptr.1.
    #[arg(long, value_name = "DIR", value_parser = crate::output::plot_dir)]
    dir: Option<PathBuf>,
}

pub fn completions(a: CompletionArgs) -> Result<(), String> {
    let mut cmd = crate::command();
    let mut buf = Vec::new();
    clap_complete::generate(a.shell, &mut cmd, "userptr", &mut buf);
    std::io::stdout()
        .write_all(&buf)
        .map_err(|e| format!("writing the completions: {e}"))
}

pub fn man(a: ManArgs) -> Result<(), String> {
    let cmd = crate::command();
    match a.dir {
        Some(dir) => {
            std::fs::create_dir_all(&dir)
                .map_err(|e| format!("creating {}: {e}", dir.display()))?;
            clap_mangen::generate_to(cmd, &dir)
                .map_err(|e| format!("writing man pages into {}: {e}", dir.display()))?;
            println!("wrote the man pages into {}", dir.display());
            Ok(())
        }
        None => {
            let mut buf = Vec::new();
            clap_mangen::Man::new(cmd)
                .date(crate::output::today())
                .source(format!("userptr {}", crate::output::LONG_VERSION))
                .render(&mut buf)
                .map_err(|e| format!("rendering the man page: {e}"))?;
            std::io::stdout()
                .write_all(&buf)
                .map_err(|e| format!("writing the man page: {e}"))
        }
    }
}
