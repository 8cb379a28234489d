//! What this machine says about itself: its name and its wall clock; and giving the memory this
//! process freed back to it.

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

/// A burst of work at least this long is followed by [`release_free_memory`] (a sync, a commit, a
/// snapshot): trimming costs milliseconds, so shorter ones are not worth it.
pub const BURST: std::time::Duration = std::time::Duration::from_secs(1);

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
