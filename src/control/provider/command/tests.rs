use super::*;
use std::path::{Path, PathBuf};

const TOKEN: &str = "sekrit-join-token-0123456789";

/// Writes an executable `#!/bin/sh` script `name` into `dir`.
fn script(dir: &Path, name: &str, body: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p.to_str().unwrap().to_string()
}

/// A tiny directory-backed cloud: one file per machine under `<dir>/m/`, holding its state.
fn cloud(dir: &Path) -> CommandSettings {
    let m = dir.join("m");
    std::fs::create_dir_all(&m).unwrap();
    let m = m.display();
    let d = dir.display();
    // The create script records everything it was given: argv, environment and stdin.
    let create = script(
        dir,
        "create",
        &format!(
            r#"set -eu
printf '%s\n' "$0" "$@" > {d}/create.argv
env > {d}/create.env
cat > {d}/create.stdin
label=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["label"])' {d}/create.stdin)
echo starting > {m}/"$label"
printf '{{"id":"%s","place":"rack-1"}}\n' "$label""#
        ),
    );
    // The listing ignores nothing and ends with two unlabelled machines.
    let list = script(
        dir,
        "list",
        &format!(
            r#"set -eu
cat > {d}/list.stdin
printf '['
for f in {m}/*; do
  [ -e "$f" ] || continue
  l=$(basename "$f")
  printf '{{"id":"%s","label":"%s","state":"%s"}},' "$l" "$l" "$(cat "$f")"
done
echo '{{"id":"no-label"}},{{"id":"empty-label","label":""}}]'"#
        ),
    );
    let get = script(
        dir,
        "get",
        &format!(
            r#"set -eu
id=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
if [ -e {m}/"$id" ]; then
  printf '{{"id":"%s","label":"%s","state":"%s","place":"rack-1"}}\n' "$id" "$id" "$(cat {m}/"$id")"
else
  echo null
fi"#
        ),
    );
    let destroy = script(
        dir,
        "destroy",
        &format!(
            r#"set -eu
id=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
echo "$STANDBY_OP $id" >> {d}/destroyed
rm -f {m}/"$id""#
        ),
    );
    let search = script(
        dir,
        "search",
        r#"set -eu
role=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["role"])')
if [ "$role" = gpu ]; then
  echo '[{"id":"g1","gpu_name":"H100","num_gpus":8,"price_per_hour":2.5,"reliability":0.99,"region":"eu","place":"z1","disk_gb":500,"inet_down_mbps":1000,"extra":true},{"id":42}]'
else
  echo '[{"id":"c1","price_per_hour":0.1,"place":null}]'
fi"#,
    );
    CommandSettings {
        create: vec![create],
        destroy: vec![destroy],
        list: vec![list],
        search: vec![search],
        get: vec![get],
        timeout: Some(Duration::from_secs(30)),
    }
}

fn startup(label: &str) -> Startup {
    Startup {
        pair: "p1".into(),
        role: Side::Gpu,
        coordinator: "10.0.0.1:7700".into(),
        join_token: TOKEN.into(),
        label: label.into(),
    }
}

fn only(dir: &Path, name: &str, body: &str) -> CommandProvider {
    let p = script(dir, name, body);
    CommandProvider::new(CommandSettings {
        create: vec![p.clone()],
        destroy: vec![p.clone()],
        list: vec![p],
        ..Default::default()
    })
    .unwrap()
}

fn rejected(r: Result<impl std::fmt::Debug, ProviderError>) -> String {
    match r {
        Err(ProviderError::Rejected(m)) => m,
        other => panic!("expected Rejected, got {other:?}"),
    }
}

fn transient(r: Result<impl std::fmt::Debug, ProviderError>) -> String {
    match r {
        Err(ProviderError::Transient(m)) => m,
        other => panic!("expected Transient, got {other:?}"),
    }
}

#[tokio::test]
async fn round_trip_and_token_only_on_stdin() {
    let t = tempfile::tempdir().unwrap();
    let p = CommandProvider::new(cloud(t.path())).unwrap();
    assert_eq!(p.name(), "command");

    let offers = p.search(Side::Gpu).await.unwrap();
    assert_eq!(offers.len(), 2);
    assert_eq!(
        offers[0],
        Offer {
            id: "g1".into(),
            place: "z1".into(),
            region: "eu".into(),
            gpu_name: "H100".into(),
            num_gpus: 8,
            price_per_hour: 2.5,
            reliability: 0.99,
            disk_gb: 500.0,
            inet_down_mbps: 1000.0,
        }
    );
    assert_eq!(offers[1].id, "42");
    let cpu = p.search(Side::Cpu).await.unwrap();
    assert_eq!(cpu.len(), 1);
    assert_eq!((cpu[0].id.as_str(), cpu[0].place.as_str()), ("c1", ""));

    let m = p.create(&offers[0], &startup("sb-p1-gpu-1")).await.unwrap();
    assert_eq!(
        m,
        Machine {
            id: "sb-p1-gpu-1".into(),
            label: "sb-p1-gpu-1".into(),
            state: MachineState::Starting,
            place: "rack-1".into(),
        }
    );
    // The token is on stdin and nowhere else.
    let argv = std::fs::read_to_string(t.path().join("create.argv")).unwrap();
    let env = std::fs::read_to_string(t.path().join("create.env")).unwrap();
    let stdin = std::fs::read_to_string(t.path().join("create.stdin")).unwrap();
    assert!(!argv.contains(TOKEN), "{argv}");
    assert!(!env.contains(TOKEN), "{env}");
    assert!(env.lines().any(|l| l == "STANDBY_OP=create"), "{env}");
    assert!(stdin.ends_with('\n'));
    let req: Value = serde_json::from_str(&stdin).unwrap();
    assert_eq!(req["op"], "create");
    assert_eq!(req["join_token"], TOKEN);
    assert_eq!(req["label"], "sb-p1-gpu-1");
    assert_eq!(req["pair"], "p1");
    assert_eq!(req["role"], "gpu");
    assert_eq!(req["coordinator"], "10.0.0.1:7700");
    assert_eq!(req["offer"]["id"], "g1");
    assert_eq!(req["offer"]["num_gpus"], 8);
    assert_eq!(req["offer"]["place"], "z1");

    p.create(&offers[0], &startup("sb-p1-cpu-1")).await.unwrap();
    std::fs::write(t.path().join("m/sb-p1-cpu-1"), "running").unwrap();
    std::fs::write(t.path().join("m/other-1"), "stopped").unwrap();

    let all = p.list("sb-").await.unwrap();
    let ids: Vec<(&str, MachineState)> = all.iter().map(|m| (m.id.as_str(), m.state)).collect();
    assert_eq!(
        ids,
        vec![
            ("sb-p1-cpu-1", MachineState::Running),
            ("sb-p1-gpu-1", MachineState::Starting)
        ]
    );
    let listed: Value =
        serde_json::from_str(&std::fs::read_to_string(t.path().join("list.stdin")).unwrap())
            .unwrap();
    assert_eq!(listed, json!({"op": "list", "prefix": "sb-"}));
    // The empty prefix lists everything labelled, the unlabelled entries are ignored.
    let mut all: Vec<String> = p
        .list("")
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.id)
        .collect();
    all.sort();
    assert_eq!(all, vec!["other-1", "sb-p1-cpu-1", "sb-p1-gpu-1"]);

    let got = p.get("sb-p1-cpu-1").await.unwrap().unwrap();
    assert_eq!(got.state, MachineState::Running);
    assert_eq!(got.place, "rack-1");
    assert_eq!(p.get("nope").await.unwrap(), None);

    p.destroy("sb-p1-cpu-1").await.unwrap();
    p.destroy("sb-p1-cpu-1").await.unwrap(); // already gone: still fine
    assert_eq!(p.get("sb-p1-cpu-1").await.unwrap(), None);
    let destroyed = std::fs::read_to_string(t.path().join("destroyed")).unwrap();
    assert_eq!(destroyed, "destroy sb-p1-cpu-1\ndestroy sb-p1-cpu-1\n");
    assert_eq!(p.list("sb-").await.unwrap().len(), 1);
}

#[tokio::test]
async fn get_falls_back_to_list_and_list_filters_by_prefix() {
    let t = tempfile::tempdir().unwrap();
    // This list ignores the prefix and prints everything.
    let p = only(
        t.path(),
        "list",
        r#"cat > /dev/null
echo '[{"id":"1","label":"sb-a","state":"running","place":"h1"},{"id":"2","label":"xx-b","state":"stopped"},{"id":"3"}]'"#,
    );
    let ids: Vec<String> = p
        .list("sb-")
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(ids, vec!["1"]);
    assert_eq!(
        p.get("2").await.unwrap(),
        Some(Machine {
            id: "2".into(),
            label: "xx-b".into(),
            state: MachineState::Stopped,
            place: String::new(),
        })
    );
    assert_eq!(p.get("1").await.unwrap().unwrap().place, "h1");
    assert_eq!(p.get("3").await.unwrap(), None); // unlabelled: not ours
    assert_eq!(p.get("9").await.unwrap(), None);
}

#[tokio::test]
async fn default_search_offer() {
    let t = tempfile::tempdir().unwrap();
    let p = only(t.path(), "x", "exit 1");
    let g = p.search(Side::Gpu).await.unwrap();
    assert_eq!(
        g,
        vec![Offer {
            id: "default".into(),
            num_gpus: 1,
            reliability: 1.0,
            ..Offer::default()
        }]
    );
    assert_eq!(p.search(Side::Cpu).await.unwrap()[0].num_gpus, 0);
}

#[tokio::test]
async fn exit_statuses_are_classified() {
    let t = tempfile::tempdir().unwrap();
    let p = only(
        t.path(),
        "tempfail",
        "cat >/dev/null; echo 'quota check failed, try later' >&2; exit 75",
    );
    let m = transient(p.list("").await);
    assert!(m.contains("list program"), "{m}");
    assert!(m.contains("exit status 75"), "{m}");
    assert!(m.contains("quota check failed, try later"), "{m}");

    let p = only(
        t.path(),
        "fail",
        "cat >/dev/null; yes 'padding padding' | head -n 200 >&2; echo 'zone does not exist' >&2; exit 1",
    );
    let m = rejected(p.create(&Offer::default(), &startup("l")).await);
    assert!(m.contains("create program"), "{m}");
    assert!(m.contains("/fail"), "{m}");
    assert!(m.contains("exit status 1"), "{m}");
    assert!(m.ends_with("zone does not exist"), "{m}");
    assert!(m.len() < 600, "only the end of stderr is quoted: {m}");
    assert!(!m.contains(TOKEN));

    let p = only(t.path(), "signal", "kill -TERM $$");
    let m = transient(p.destroy("x").await);
    assert!(m.contains("signal 15"), "{m}");

    // A program that does not read its request and exits 0 is fine for destroy.
    let p = only(t.path(), "ok", "exit 0");
    p.destroy("x").await.unwrap();
}

#[tokio::test]
async fn unparseable_replies_are_transient() {
    let t = tempfile::tempdir().unwrap();
    let p = only(
        t.path(),
        "garbage",
        "echo 'Error: something went wrong'; exit 0",
    );
    let m = transient(p.list("").await);
    assert!(m.contains("unexpected reply"), "{m}");
    assert!(m.contains("Error: something went wrong"), "{m}");
    let m = transient(p.create(&Offer::default(), &startup("l")).await);
    assert!(m.contains("create program"), "{m}");

    let p = only(t.path(), "empty", "exit 0");
    transient(p.create(&Offer::default(), &startup("l")).await);
    let p = only(t.path(), "state", r#"echo '{"id":"a","state":"exploded"}'"#);
    let m = transient(p.create(&Offer::default(), &startup("l")).await);
    assert!(m.contains("exploded"), "{m}");
    let p = only(t.path(), "noid", r#"echo '{"label":"l"}'"#);
    transient(p.create(&Offer::default(), &startup("l")).await);
    // A machine without a label from create carries the requested one.
    let p = only(t.path(), "nolabel", r#"echo '{"id":7,"state":"running"}'"#);
    let m = p.create(&Offer::default(), &startup("sb-x")).await.unwrap();
    assert_eq!((m.id.as_str(), m.label.as_str()), ("7", "sb-x"));
    assert_eq!(m.state, MachineState::Running);
    // Long garbage is quoted only in part.
    let p = only(t.path(), "long", "yes garbage | head -c 100000");
    let m = transient(p.list("").await);
    assert!(m.len() < 600, "{m}");
}

fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks the process exists.
    let exists = unsafe { libc::kill(pid, 0) } == 0;
    exists
        && !std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
            s.rsplit(')')
                .next()
                .is_some_and(|r| r.trim_start().starts_with('Z'))
        })
}

fn read_pid(p: &PathBuf) -> i32 {
    std::fs::read_to_string(p).unwrap().trim().parse().unwrap()
}

#[tokio::test]
async fn timeout_kills_the_process_group() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path().display();
    let body =
        format!("sleep 1000 &\necho $! > {d}/child.pid\necho $$ > {d}/self.pid\nsleep 1000\n");
    let path = script(t.path(), "hang", &body);
    let p = CommandProvider::new(CommandSettings {
        create: vec![path.clone()],
        destroy: vec![path.clone()],
        list: vec![path],
        timeout: Some(Duration::from_secs(1)),
        ..Default::default()
    })
    .unwrap();
    let start = std::time::Instant::now();
    let m = transient(p.list("").await);
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );
    assert!(m.contains("timed out after 1 s"), "{m}");
    let child = read_pid(&t.path().join("child.pid"));
    let me = read_pid(&t.path().join("self.pid"));
    // The background child is reparented and reaped by init: allow it a moment.
    let until = std::time::Instant::now() + Duration::from_secs(5);
    while (alive(child) || alive(me)) && std::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!alive(me), "the program survived its timeout");
    assert!(!alive(child), "its child survived the timeout");
}

#[tokio::test]
async fn abandoned_call_kills_the_process_group() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path().display();
    let body = format!(
        "sleep 1000 &\necho $! > {d}/child.pid.tmp\nmv {d}/child.pid.tmp {d}/child.pid\nsleep 1000\n"
    );
    let p = only(t.path(), "hang", &body);
    let pidfile = t.path().join("child.pid");
    let r = tokio::time::timeout(Duration::from_secs(20), async {
        tokio::select! {
            r = p.list("") => panic!("the call ended: {r:?}"),
            _ = async {
                while !pidfile.exists() {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            } => {}
        }
    })
    .await;
    assert!(r.is_ok(), "the script never started");
    let child = read_pid(&pidfile);
    let until = std::time::Instant::now() + Duration::from_secs(5);
    while alive(child) && std::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!alive(child), "dropping the call left its child running");
}

#[tokio::test]
async fn exited_program_with_a_lingering_child_does_not_hang() {
    let t = tempfile::tempdir().unwrap();
    // The background child keeps stdout open after the program exits.
    let p = only(t.path(), "linger", "echo '[]'\nsleep 5 &\nexit 0");
    let start = std::time::Instant::now();
    assert_eq!(p.list("").await.unwrap(), vec![]);
    assert!(start.elapsed() < Duration::from_secs(20));
}

#[tokio::test]
async fn huge_stdout_is_an_error() {
    let t = tempfile::tempdir().unwrap();
    let p = only(t.path(), "huge", "cat /dev/zero");
    let m = transient(p.list("").await);
    assert!(m.contains("more than 16 MiB"), "{m}");
}

#[tokio::test]
async fn missing_or_unrunnable_programs_are_rejected() {
    let t = tempfile::tempdir().unwrap();
    let missing = t.path().join("does-not-exist").display().to_string();
    let p = CommandProvider::new(CommandSettings {
        create: vec![missing.clone()],
        destroy: vec![missing.clone()],
        list: vec![missing],
        ..Default::default()
    })
    .unwrap();
    let m = rejected(p.list("").await);
    assert!(m.contains("does-not-exist"), "{m}");
    assert!(m.contains("could not be started"), "{m}");

    let plain = t.path().join("not-executable");
    std::fs::write(&plain, "#!/bin/sh\necho []\n").unwrap();
    let plain = plain.display().to_string();
    let p = CommandProvider::new(CommandSettings {
        create: vec![plain.clone()],
        destroy: vec![plain.clone()],
        list: vec![plain],
        ..Default::default()
    })
    .unwrap();
    let m = rejected(p.list("").await);
    assert!(m.contains("chmod"), "{m}");
}

#[test]
fn settings_are_checked() {
    let ok = |s: &str| toml::from_str::<CommandSettings>(s);
    let s = ok(r#"
            create = ["/opt/c.sh", "--zone", "x"]
            destroy = "/opt/d.sh"
            list = ["/opt/l.sh"]
            timeout = "2m"
        "#)
    .unwrap();
    assert_eq!(s.create, vec!["/opt/c.sh", "--zone", "x"]);
    assert_eq!(s.destroy, vec!["/opt/d.sh"]);
    assert!(s.search.is_empty() && s.get.is_empty());
    assert_eq!(s.timeout, Some(Duration::from_secs(120)));
    let p = CommandProvider::new(s.clone()).unwrap();
    assert!(p.search.is_none() && p.get.is_none());
    assert_eq!(p.timeout, Duration::from_secs(120));
    assert_eq!(
        CommandProvider::new(CommandSettings {
            timeout: None,
            ..s.clone()
        })
        .unwrap()
        .timeout,
        DEFAULT_TIMEOUT
    );

    let m = rejected(CommandProvider::new(CommandSettings {
        list: vec![],
        ..s.clone()
    }));
    assert!(m.contains("`list`"), "{m}");
    let m = rejected(CommandProvider::new(CommandSettings {
        create: vec![" ".into()],
        ..s.clone()
    }));
    assert!(m.contains("`create`"), "{m}");
    rejected(CommandProvider::new(CommandSettings {
        get: vec!["".into(), "x".into()],
        ..s.clone()
    }));
    rejected(CommandProvider::new(CommandSettings {
        timeout: Some(Duration::ZERO),
        ..s.clone()
    }));
    rejected(CommandProvider::new(CommandSettings::default()));

    assert!(ok("create = 5").is_err());
    assert!(ok("create = [1]").is_err());
    assert!(ok("timeout = \"soon\"").is_err());
    assert!(ok("typo = \"x\"").is_err());
}
