use std::process::ExitCode;

fn main() -> ExitCode {
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
