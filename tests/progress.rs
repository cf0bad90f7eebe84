//! The push's progress bar: drawn on a terminal (a pty from `script`), absent otherwise.

mod util;

use std::process::Command;
use std::time::Duration;

use util::*;

#[test]
fn progress_bar_on_a_terminal_only() {
    let c = Cluster::start(1);
    let src = tempdir();
    // Big enough that the push lasts several 200 ms redraws even on a fast machine.
    write_random_file(&src.path().join("big.bin"), 512 << 20, 5);
    let push = format!(
        "NO_COLOR=1 {BIN} push {} --name bar --version 1 --to {}",
        src.path().join("big.bin").display(),
        c.addr(0)
    );
    // `script` runs the command on a pseudo-terminal and copies what it writes.
    let out = run_timeout(Command::new("script").args(["-qfec", &push, "/dev/null"]), Duration::from_secs(120));
    assert_eq!(code(&out), 0, "{}", show_output(&out));
    let text = stdout_str(&out);
    assert!(text.contains("% ") && text.contains("GB/s") && text.contains("ETA"), "no progress bar:\n{text}");
    assert!(text.contains("\x1b[K"), "the bar is not cleared at the end:\n{text}");

    // Not a terminal: no bar, no carriage returns.
    let out = c.push(&src.path().join("big.bin"), "bar", 2, &[]);
    c.assert_push_ok(&out);
    assert!(!stderr_str(&out).contains('\r') && !stdout_str(&out).contains('\r'), "{}", show_output(&out));
}
