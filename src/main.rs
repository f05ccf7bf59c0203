use std::process::ExitCode;

fn main() -> ExitCode {
    // Rust ignores SIGPIPE, so printing to a closed pipe (`... --json | head`) would panic
    // in println!; restore the default, ending quietly as other Unix tools do. Outputs are
    // written atomically before anything is printed, so nothing is left half-written.
    // SAFETY: resets one signal's disposition before any other thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    // A run stopped by Ctrl-C or `kill` removes the file it was writing. Without the
    // handler (it cannot start: no thread) a stopped run leaves its temporary, as before.
    let _ = lalora_engine::io::remove_partial_outputs_on_signals();
    match lalora_engine::cli::run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line, always: a multi-line message is folded.
            let msg = e.to_string().replace('\n', " ");
            eprintln!("error: {msg}");
            ExitCode::from(e.exit_code())
        }
    }
}
