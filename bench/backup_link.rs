//! Benchmark: off-site upload throughput through a shaped link (issue 14: "upload ≥ 90 % of the
//! link").
//!
//! `cargo bench --bench backup_link` (release; needs root, for network namespaces and `tc`:
//! without it, it prints why and does nothing). The S3 server the backup tests use (moto,
//! `tests/backup/server.rs`) runs in one network namespace, the uploader in another, joined by a
//! veth pair whose client side is shaped with `tc tbf` (`tests/common/netns.rs`). Each round
//! uploads a store of `STANDBY_BENCH_LINK_PACKS` (default 6) packs of 8 MiB of incompressible
//! content and a snapshot into a fresh prefix with the backup's own `Mirror::pass` (sealed with
//! the backup key, 3 objects in flight, 8 MiB bodies in one request or 5 MiB parts), through a
//! link of `STANDBY_BENCH_LINK_MBIT` (default 40) Mbit/s, `STANDBY_BENCH_LINK_ROUNDS` (default 3)
//! times.
//!
//! Prints, per round and as the median: the link rate, the achieved rate (sealed bytes
//! uploaded ÷ the pass's wall time, from its start to the last object stored) and their ratio.
//! Nothing is asserted about rates.

#[path = "../tests/common/mod.rs"]
mod common;
#[allow(dead_code)]
#[path = "../tests/backup/server.rs"]
mod server;
#[path = "../tests/backup/shaped.rs"]
mod shaped;
#[allow(dead_code)]
#[path = "../tests/backup/store.rs"]
mod store;

const NAME: &str = "backup_link";

fn env_u64(k: &str, d: u64) -> u64 {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

/// One round: a fresh store uploaded into its own prefix. Returns (sealed bytes, seconds).
fn round(s3: &server::S3, netns: &str, packs: u64, n: u64) -> (u64, f64) {
    let mut st = store::Store::new();
    let names: Vec<String> = (0..packs)
        .map(|i| st.add_pack(&store::content(1000 * n + i, 8 << 20)))
        .collect();
    st.add_snapshot(1, &names.iter().collect::<Vec<_>>());
    shaped::upload(s3, netns, &st, &format!("round{n}"), n == 0)
}

fn main() {
    // `cargo bench` passes --bench; nothing else to parse.
    // SAFETY: geteuid(2) takes nothing and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        println!("{NAME}: skipped: needs root (network namespaces and tc)");
        return;
    }
    let Some(program) = server::program(NAME) else {
        return;
    };
    let mbit = env_u64("STANDBY_BENCH_LINK_MBIT", 40);
    let packs = env_u64("STANDBY_BENCH_LINK_PACKS", 6);
    let rounds = env_u64("STANDBY_BENCH_LINK_ROUNDS", 3).max(1);
    let mut net = common::netns::Net::new();
    net.host("cli");
    net.host("s3");
    let link = net.link("cli", "s3", 74);
    link.shape(&format!("{mbit}mbit"));
    let mut cmd = net.cmd("s3", program.to_str().unwrap());
    cmd.env("PYTHONUNBUFFERED", "1");
    let s3 = server::spawn(NAME, cmd, &link.ip_b, 9000);
    let netns = format!("/run/netns/{}", net.ns("cli"));
    let link_bytes = (mbit * 1_000_000 / 8) as f64;
    println!(
        "{rounds} rounds: {packs} x 8 MiB packs and a snapshot each, through a {mbit} Mbit/s tc tbf link"
    );
    let mut ratios = Vec::new();
    for n in 0..rounds {
        let (bytes, secs) = round(&s3, &netns, packs, n);
        let achieved = bytes as f64 / secs;
        let ratio = achieved / link_bytes;
        println!(
            "round {n}: {bytes} bytes in {secs:.2} s: link {mbit:.1} Mbit/s, achieved {:.1} Mbit/s, {:.1} % of the link",
            achieved * 8.0 / 1e6,
            ratio * 100.0
        );
        ratios.push(ratio);
    }
    ratios.sort_by(f64::total_cmp);
    let median = ratios[ratios.len() / 2];
    println!();
    println!("| link | achieved (median of {rounds}) | achieved ÷ link | target |");
    println!("|---|---|---|---|");
    println!(
        "| {mbit} Mbit/s | {:.1} Mbit/s | {:.1} % (min {:.1} %, max {:.1} %) | ≥ 90 % |",
        median * link_bytes * 8.0 / 1e6,
        median * 100.0,
        ratios[0] * 100.0,
        ratios[ratios.len() - 1] * 100.0
    );
    drop(s3);
}
