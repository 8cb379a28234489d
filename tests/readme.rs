//! Every command of our three programs that the README shows in a shell code block exists and
//! parses: each is run with `--help` appended, so clap walks the real subcommands and flags (an
//! unknown subcommand, flag or enum value before `--help` is an error) without running anything.
//! A failure names the README line. Commands of other tools are skipped by name; an unknown
//! program fails too, so a misspelt `cordinator` is caught. Synopsis notation is read as the
//! README means it: `[--opt X]` is shown (checked), `(A | B)` and `x|y` take the first choice.

mod common;

use std::process::{Command, Stdio};

use common::{AGENT_CPU, AGENT_GPU, COORDINATOR};

/// Programs of other tools the README runs; their commands are not checked.
const OTHER_TOOLS: &[&str] = &[
    "cargo",
    "export",
    "pip",
    "python3",
    "venv/bin/pip",
    "venv/bin/python",
    "mkdir",
    "systemctl",
    "systemd-sysusers",
    "chown",
    "install",
    "docker",
    "sha256sum",
];

/// One command line as the README shows it: where, and the words after continuation lines were
/// joined and comments, redirections and synopsis brackets were read.
#[derive(Debug)]
struct Shown {
    line: usize,
    text: String,
    words: Vec<String>,
}

/// The logical lines of the README's `sh`/`bash`/`shell` code blocks, with their line numbers.
fn shell_lines(readme: &str) -> Vec<(usize, String)> {
    let (mut out, mut open, mut shell) = (Vec::new(), false, false);
    let mut pending: Option<(usize, String)> = None;
    for (i, line) in readme.lines().enumerate() {
        if let Some(lang) = line.trim_start().strip_prefix("```") {
            shell = !open && matches!(lang.trim(), "sh" | "bash" | "shell");
            open = !open;
            pending = None;
            continue;
        }
        if !shell {
            continue;
        }
        let (start, mut text) = pending.take().unwrap_or((i + 1, String::new()));
        let l = line.trim_end();
        if let Some(head) = l.strip_suffix('\\') {
            text.push_str(head);
            text.push(' ');
            pending = Some((start, text));
        } else {
            text.push_str(l);
            out.push((start, text));
        }
    }
    out
}

/// `line` without its comment (a `#` at the start of a word, outside quotes).
fn strip_comment(line: &str) -> String {
    let (mut out, mut quote, mut prev) = (String::new(), None, ' ');
    for c in line.chars() {
        match (quote, c) {
            (None, '#') if prev.is_whitespace() => break,
            (None, '\'' | '"') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            _ => {}
        }
        out.push(c);
        prev = c;
    }
    out
}

/// Synopsis groups read as meant: `[A]` becomes `A`, `(A | B)` and `[--opt x|y]` their first
/// choice.
fn read_synopsis(line: &str) -> String {
    let mut out = String::new();
    let mut rest = line;
    while let Some(pos) = rest.find(['[', '(']) {
        let at_word = pos == 0 || rest[..pos].ends_with(' ');
        let close = if rest.as_bytes()[pos] == b'[' {
            ']'
        } else {
            ')'
        };
        match rest[pos..].find(close) {
            Some(end) if at_word => {
                out.push_str(&rest[..pos]);
                let inner = &rest[pos + 1..pos + end];
                out.push_str(inner.split('|').next().unwrap_or("").trim());
                rest = &rest[pos + end + 1..];
            }
            _ => {
                out.push_str(&rest[..=pos]);
                rest = &rest[pos + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// Shell words, quotes removed; `|`, `&&`, `||` and `;` end a command.
fn commands(line: &str) -> Vec<Vec<String>> {
    let (mut cmds, mut words, mut word) = (Vec::new(), Vec::new(), String::new());
    let (mut quote, mut chars) = (None, line.chars().peekable());
    let end_word = |words: &mut Vec<String>, word: &mut String| {
        if !word.is_empty() {
            words.push(std::mem::take(word));
        }
    };
    while let Some(c) = chars.next() {
        match (quote, c) {
            (None, '\'' | '"') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => word.push(c),
            (None, c) if c.is_whitespace() => end_word(&mut words, &mut word),
            (None, '|' | ';' | '&') => {
                end_word(&mut words, &mut word);
                if chars.peek() == Some(&c) {
                    chars.next();
                }
                cmds.push(std::mem::take(&mut words));
            }
            (None, c) => word.push(c),
        }
    }
    end_word(&mut words, &mut word);
    cmds.push(words);
    cmds.retain(|w| !w.is_empty());
    cmds
}

/// Drops redirections (`> FILE`, `2>FILE`, `< FILE`) and leading `VAR=value` assignments.
fn simple(mut words: Vec<String>) -> Vec<String> {
    let mut out = Vec::new();
    let mut it = words.drain(..).peekable();
    while let Some(w) = it.next() {
        let redirect = w.trim_start_matches(|c: char| c.is_ascii_digit());
        if redirect == ">" || redirect == ">>" || redirect == "<" {
            it.next();
        } else if !(redirect.starts_with('>') || redirect.starts_with('<')) {
            out.push(w);
        }
    }
    let skip = out
        .iter()
        .take_while(|w| w.split_once('=').is_some_and(|(k, _)| is_var(k)))
        .count();
    out.split_off(skip)
}

fn is_var(k: &str) -> bool {
    !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Every command of the README's shell blocks.
fn shown(readme: &str) -> Vec<Shown> {
    let mut out = Vec::new();
    for (line, text) in shell_lines(readme) {
        let read = read_synopsis(&strip_comment(&text));
        for words in commands(&read) {
            let words = simple(words);
            if !words.is_empty() {
                out.push(Shown {
                    line,
                    text: text.trim().to_string(),
                    words,
                });
            }
        }
    }
    out
}

/// Our program and its arguments, for a command that runs one of them (also through
/// `cargo run --bin NAME -- ARGS`); None for another tool; Err for a program nobody knows.
fn ours(words: &[String]) -> Result<Option<(&'static str, Vec<String>)>, String> {
    let program = words[0].as_str();
    if program == "cargo" {
        let bin = words
            .iter()
            .position(|w| w == "--bin")
            .map(|i| &words[i + 1]);
        let args = match words.iter().position(|w| w == "--") {
            Some(i) => words[i + 1..].to_vec(),
            None => vec![],
        };
        return Ok(bin.and_then(|b| binary(b)).map(|b| (b, args)));
    }
    let name = program.rsplit('/').next().unwrap_or(program);
    if let Some(b) = binary(name) {
        return Ok(Some((b, words[1..].to_vec())));
    }
    if OTHER_TOOLS.contains(&program) {
        return Ok(None);
    }
    Err(format!(
        "unknown program `{program}` (ours are coordinator, agent-gpu, agent-cpu; add another \
         tool to OTHER_TOOLS in tests/readme.rs)"
    ))
}

fn binary(name: &str) -> Option<&'static str> {
    match name {
        "coordinator" => Some(COORDINATOR),
        "agent-gpu" => Some(AGENT_GPU),
        "agent-cpu" => Some(AGENT_CPU),
        _ => None,
    }
}

/// Runs each shown command of ours with `--help` appended; the failures, one line each naming
/// the README line, and how many commands were checked.
fn check(readme: &str) -> (Vec<String>, usize) {
    let (mut failures, mut checked) = (Vec::new(), 0);
    for s in shown(readme) {
        let (bin, args) = match ours(&s.words) {
            Ok(Some(x)) => x,
            Ok(None) => continue,
            Err(e) => {
                failures.push(format!("README line {}: `{}`: {e}", s.line, s.text));
                continue;
            }
        };
        checked += 1;
        let mut cmd = Command::new(bin);
        cmd.args(&args).arg("--help").stdin(Stdio::null());
        // The environment must not fill in what the README line leaves out.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("STANDBY_") {
                cmd.env_remove(&k);
            }
        }
        let out = cmd.output().unwrap();
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            let why = err.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
            failures.push(format!(
                "README line {}: `{}` does not parse ({}): {why}",
                s.line, s.text, out.status
            ));
        }
    }
    (failures, checked)
}

#[test]
fn every_command_the_readme_shows_exists_and_parses() {
    let readme = include_str!("../README.md");
    let (failures, checked) = check(readme);
    println!("{checked} README commands checked");
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
    // The checker saw the blocks at all: the README shows each program many times (27
    // commands when this test was written).
    assert!(checked >= 20, "only {checked} commands found in README.md");
    let programs: Vec<&str> = shown(readme)
        .iter()
        .filter_map(|s| ours(&s.words).ok().flatten())
        .map(|(bin, _)| bin)
        .collect();
    for bin in [COORDINATOR, AGENT_GPU, AGENT_CPU] {
        assert!(programs.contains(&bin), "no README command runs {bin}");
    }
}

#[test]
fn a_flag_or_subcommand_the_binary_lacks_fails_naming_the_line() {
    let readme = "intro\n\n```sh\ncoordinator pairs --json\ncoordinator pairs --no-such-flag   # comment\n\
                  agent-gpu flush --state-dir /s --timeout 3s \\\n    --bogus\n```\n\n\
                  ```sh\ncoordinator machines stop-all --dir D --remove\ncoordinator machines start-all --dir D\n\
                  cordinator pairs\n```\n";
    let (failures, checked) = check(readme);
    assert_eq!(checked, 5, "{failures:?}");
    assert_eq!(failures.len(), 4, "{failures:#?}");
    assert!(
        failures[0].starts_with("README line 5: `coordinator pairs --no-such-flag"),
        "{}",
        failures[0]
    );
    assert!(failures[0].contains("--no-such-flag"), "{}", failures[0]);
    assert!(
        failures[1].starts_with("README line 6: `agent-gpu flush"),
        "{}",
        failures[1]
    );
    assert!(
        failures[2].starts_with("README line 12:"),
        "{}",
        failures[2]
    );
    assert!(
        failures[3].contains("unknown program `cordinator`"),
        "{}",
        failures[3]
    );
}

#[test]
fn synopsis_redirections_and_other_tools_are_read_as_meant() {
    let readme = "```sh\nB=target/release\n$B/coordinator init --dir ca\n\
                  coordinator restore PAIR (--at TIME | --snapshot ID) [--path P] --to DIR\n\
                  coordinator recover pair-1 --from-backup [--snapshot latest|ID] --follow\n\
                  coordinator completions bash > /etc/bash_completion.d/coordinator\n\
                  STANDBY_TEST_SEED=42 cargo test --test chaos -- --nocapture\n\
                  cargo run --release --bin coordinator -- demo\n\
                  python3 -m venv venv && venv/bin/pip install grpcio\n```\n\
                  ```python\nimport standby\n```\n";
    let got: Vec<Vec<String>> = shown(readme).into_iter().map(|s| s.words).collect();
    let w = |s: &str| s.split(' ').map(String::from).collect::<Vec<_>>();
    assert_eq!(
        got,
        vec![
            w("$B/coordinator init --dir ca"),
            w("coordinator restore PAIR --at TIME --path P --to DIR"),
            w("coordinator recover pair-1 --from-backup --snapshot latest --follow"),
            w("coordinator completions bash"),
            w("cargo test --test chaos -- --nocapture"),
            w("cargo run --release --bin coordinator -- demo"),
            w("python3 -m venv venv"),
            w("venv/bin/pip install grpcio"),
        ]
    );
    let (failures, checked) = check(readme);
    // `B=target/release` alone is an assignment, not a command.
    assert_eq!((failures.len(), checked), (0, 5), "{failures:#?}");
}

/// The flags in the first column of the README table headed `| {heading} | env |`.
fn table_flags(readme: &str, heading: &str) -> Vec<String> {
    let head = format!("| {heading} | env |");
    let mut lines = readme.lines().skip_while(|l| !l.starts_with(&head));
    assert!(
        lines.next().is_some(),
        "README.md has no table headed {head:?}"
    );
    let mut flags = Vec::new();
    for row in lines.skip(1).take_while(|l| l.starts_with('|')) {
        let first = row.split('|').nth(1).unwrap_or("");
        flags.extend(long_flags(first));
    }
    flags
}

/// The `--long-flags` a text names, in order, without repeats.
fn long_flags(text: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for (i, _) in text.match_indices("--") {
        let name: String = text[i + 2..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
            .collect();
        let flag = format!("--{name}");
        if name.starts_with(|c: char| c.is_ascii_lowercase()) && !out.contains(&flag) {
            out.push(flag);
        }
    }
    out
}

/// The flags a program's `--help` lists (each option line's long name).
fn help_flags(bin: &str, sub: &[&str]) -> Vec<String> {
    let out = Command::new(bin).args(sub).arg("--help").output().unwrap();
    assert!(out.status.success(), "{bin} {sub:?} --help");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .map(str::trim_start)
        .filter(|l| l.starts_with('-'))
        .filter_map(|l| {
            long_flags(l.split("  ").next().unwrap_or(""))
                .into_iter()
                .next()
        })
        .collect()
}

/// Flags every program has, documented in prose rather than the tables.
const GLOBAL_FLAGS: [&str; 3] = ["--help", "--version", "--log-format"];

#[test]
fn the_configuration_tables_list_exactly_the_flags_each_program_takes() {
    let readme = include_str!("../README.md");
    let both = table_flags(readme, "both agents");
    let cases: [(&str, &[&str], Vec<String>); 3] = [
        (
            AGENT_GPU,
            &[],
            [table_flags(readme, "agent-gpu"), both.clone()].concat(),
        ),
        (
            AGENT_CPU,
            &[],
            [table_flags(readme, "agent-cpu"), both.clone()].concat(),
        ),
        (
            COORDINATOR,
            &["serve"],
            table_flags(readme, "coordinator serve"),
        ),
    ];
    let mut problems = Vec::new();
    for (bin, sub, table) in cases {
        let help = help_flags(bin, sub);
        assert!(help.len() > 10, "{bin} {sub:?}: {help:?}");
        let name = [bin.rsplit('/').next().unwrap()]
            .into_iter()
            .chain(sub.iter().copied())
            .collect::<Vec<_>>()
            .join(" ");
        for f in &table {
            if !help.contains(f) {
                problems.push(format!(
                    "{name}: the README's table shows {f}, --help does not"
                ));
            }
        }
        for f in &help {
            if !table.contains(f) && !GLOBAL_FLAGS.contains(&f.as_str()) {
                problems.push(format!(
                    "{name}: {f} is in --help but not in the README's table"
                ));
            }
        }
    }
    assert!(problems.is_empty(), "\n{}", problems.join("\n"));
}

fn help_text(bin: &str, sub: &[&str]) -> String {
    let out = Command::new(bin).args(sub).arg("--help").output().unwrap();
    assert!(out.status.success(), "{bin} {sub:?} --help");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn help_warns_of_drills_and_lists_each_provider_with_its_meaning() {
    let drill = help_text(COORDINATOR, &["drill"]);
    assert!(
        drill.contains("destroys the pair's healthy GPU machine"),
        "{drill}"
    );
    let serve = help_text(COORDINATOR, &["serve"]);
    for provider in ["local", "vastai", "gcp", "command", "none"] {
        assert!(
            serve.contains(&format!("- {provider}:")),
            "{provider} in\n{serve}"
        );
    }
    let gpu = help_text(AGENT_GPU, &[]);
    assert!(gpu.contains("a restored GPU at cutover"), "{gpu}");
    let stop = help_text(COORDINATOR, &["machines", "stop-all"]);
    assert!(
        stop.contains("--remove") && stop.contains("--grace"),
        "{stop}"
    );
}
