//! What this machine says about itself: its name and its wall clock; and the allocator of a
//! long-running agent: how it is set up, and giving the memory this process freed back to it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The kernel's host name ("unknown" when it cannot be read).
pub fn name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// Wall-clock now, milliseconds since the Unix epoch (0 for a clock set before 1970).
pub fn unix_ms_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A burst of work at least this long is followed by [`after_burst`] (a sync, a commit, a
/// snapshot): trimming costs milliseconds, so shorter ones are not worth it.
pub const BURST: Duration = Duration::from_secs(1);

/// How long after the last burst [`trim_when_idle`] trims again.
pub const IDLE_TRIM: Duration = Duration::from_secs(5);

/// glibc arenas for an agent: one per core by default (8 per core on 64-bit), each keeping what
/// its threads freed. Two are enough for an agent's few busy threads (ARCHITECTURE.md, "Memory").
const ARENAS: i32 = 2;
/// Blocks from this size on are mapped on their own and unmapped when freed; smaller ones come
/// from the heap, where a freed block serves the next one. A sync's big buffers (read groups,
/// received messages, zstd windows: up to 16 MiB) are allocated and freed by the hundred: mapped
/// each time, every page of each faulted in anew, a full sync of 768 MiB cost 0.5 CPU-s of page
/// faults on each side (ARCHITECTURE.md, "Memory").
const MMAP_THRESHOLD: i32 = 32 << 20;
/// Free memory at the top of a heap is given back on `free` only past this, so a buffer freed and
/// allocated again stays mapped; [`after_burst`] gives it all back once the burst is over.
const TRIM_THRESHOLD: i32 = 64 << 20;

/// Unix ms of the last [`after_burst`] not yet followed by an idle trim (0: none).
static BURST_AT: AtomicU64 = AtomicU64::new(0);

/// Sets up glibc's allocator for a long-running agent: [`ARENAS`] arenas, a fixed
/// [`MMAP_THRESHOLD`] and [`TRIM_THRESHOLD`]. Call it first in `main`, before any thread starts.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn tune_allocator() {
    // SAFETY: mallopt takes no pointers; glibc serializes it with every allocator call.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, ARENAS);
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
    }
}

/// Elsewhere the allocator is left as it is.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn tune_allocator() {}

/// After a burst of work: gives back what it freed now, and asks [`trim_when_idle`] to trim
/// again once things are quiet (what the burst left behind is often freed a little later: a
/// session's buffers, a manifest copy handed to the history recorder).
pub fn after_burst() {
    release_free_memory();
    BURST_AT.store(unix_ms_now().max(1), Ordering::Relaxed);
}

/// Trims once [`IDLE_TRIM`] has passed since the last [`after_burst`], until `stop`.
pub async fn trim_when_idle(stop: tokio_util::sync::CancellationToken) {
    let mut tick = tokio::time::interval(IDLE_TRIM);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let at = BURST_AT.load(Ordering::Relaxed);
        let quiet = unix_ms_now().saturating_sub(at) >= IDLE_TRIM.as_millis() as u64;
        if at != 0
            && quiet
            && BURST_AT
                .compare_exchange(at, 0, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            release_free_memory();
        }
    }
}

/// Raises the calling thread's niceness by `by` (lowers its CPU priority; a thread may always
/// do that, never undo it without privilege: give such work a thread of its own).
pub fn lower_this_threads_priority(by: i32) -> std::io::Result<()> {
    let tid = rustix::thread::gettid();
    let now = rustix::process::getpriority_process(Some(tid))?;
    rustix::process::setpriority_process(Some(tid), (now + by).min(19))?;
    Ok(())
}

/// Gives the pages this process freed back to the system (glibc's `malloc_trim(0)`; true when
/// any came back). glibc keeps what each thread freed in that thread's arena: after the first
/// sync of a 100k-file workspace, agent-gpu stayed at 190–250 MiB resident with about 100 MiB
/// live (ARCHITECTURE.md, "Memory"). It walks and locks every arena in turn, so call it after a
/// burst of work, not in the middle of one.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn release_free_memory() -> bool {
    // SAFETY: malloc_trim takes no pointers; glibc serializes it with every allocator call.
    unsafe { libc::malloc_trim(0) == 1 }
}

/// Elsewhere the allocator returns memory itself (or has no such call).
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn release_free_memory() -> bool {
    false
}

#[cfg(test)]
mod tests {
    /// Megabytes allocated and freed come back: what is resident drops (or there was nothing
    /// to give back, on an allocator that returned them itself).
    #[test]
    fn freed_memory_goes_back_to_the_system() {
        fn resident_kib() -> u64 {
            let s = std::fs::read_to_string("/proc/self/status").unwrap();
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
                .unwrap()
        }
        // Many small blocks (below the mmap threshold, so they live in the heap), touched,
        // then all freed but the last, which pins the top of the heap against plain trimming.
        let mut blocks: Vec<Vec<u8>> = (0..40_000).map(|i| vec![i as u8; 4000]).collect();
        let pin = blocks.pop();
        drop(blocks);
        let before = resident_kib();
        let released = super::release_free_memory();
        let after = resident_kib();
        drop(pin);
        assert!(released, "nothing came back (resident {before} KiB)");
        assert!(
            after + 50_000 < before,
            "resident {before} KiB -> {after} KiB: less than 50 MiB came back of 160 MiB freed"
        );
    }
}
