//! The restore progress `--follow` shows (ARCHITECTURE.md, "Command-line habits").

/// A restore's progress on stdout: a bar redrawn in place (`\r`) on a terminal; in a pipe or a
/// file, which `\r` would garble, one plain line per tenth done.
pub struct Progress {
    tty: bool,
    /// A bar is drawn and its line not yet ended (terminal).
    open: bool,
    /// The last tenth printed (pipe).
    tenth: Option<u64>,
}

impl Progress {
    pub fn new(tty: bool) -> Progress {
        Progress {
            tty,
            open: false,
            tenth: None,
        }
    }

    pub fn show(&mut self, done: u64, total: u64) {
        use std::io::Write;
        if let Some(text) = self.next(done, total) {
            print!("{text}");
            std::io::stdout().flush().ok();
        }
    }

    /// What to print for `done` of `total` bytes, if anything.
    fn next(&mut self, done: u64, total: u64) -> Option<String> {
        if total == 0 {
            return None;
        }
        let f = (done as f64 / total as f64).min(1.0);
        let mib = format!("{} / {} MiB", done >> 20, total >> 20);
        if self.tty {
            let n = (f * 40.0) as usize;
            self.open = true;
            let bar = format!("{}{}", "#".repeat(n), " ".repeat(40 - n));
            return Some(format!("\r  restore [{bar}] {:>5.1}%  {mib}", f * 100.0));
        }
        let tenth = (f * 10.0) as u64;
        if self.tenth == Some(tenth) {
            return None;
        }
        self.tenth = Some(tenth);
        Some(format!("  restore {:>3}%  {mib}\n", tenth * 10))
    }

    pub fn end_line(&mut self) {
        if std::mem::take(&mut self.open) {
            println!();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Progress;

    #[test]
    fn a_bar_only_on_a_terminal() {
        let mut tty = Progress::new(true);
        let bar = tty.next(1 << 20, 4 << 20).unwrap();
        assert!(bar.starts_with("\r  restore [##########    "), "{bar:?}");
        assert!(bar.ends_with(" 25.0%  1 / 4 MiB"), "{bar:?}");
        assert!(tty.open);

        let mut pipe = Progress::new(false);
        let lines: Vec<_> = [0u64, 1, 2, 5, 9, 10]
            .iter()
            .filter_map(|mib| pipe.next(mib << 20, 10 << 20))
            .collect();
        assert_eq!(
            lines,
            [
                "  restore   0%  0 / 10 MiB\n",
                "  restore  10%  1 / 10 MiB\n",
                "  restore  20%  2 / 10 MiB\n",
                "  restore  50%  5 / 10 MiB\n",
                "  restore  90%  9 / 10 MiB\n",
                "  restore 100%  10 / 10 MiB\n",
            ]
        );
        assert_eq!(pipe.next(10 << 20, 10 << 20), None, "nothing new");
        assert!(lines.iter().all(|l| !l.contains('\r')));
        assert!(!pipe.open);
        assert_eq!(pipe.next(0, 0), None);
    }
}
