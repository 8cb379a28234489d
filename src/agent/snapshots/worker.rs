//! The recorder's own thread, at a lower CPU priority than replication (ARCHITECTURE.md,
//! "History"): on a standby short of cores, a snapshot of a generation must not slow the
//! generations still coming. The thread runs one job at a time; a niceness of [`NICE`] gives it
//! about a tenth of a core that replication wants too, and all of a core that nothing else
//! wants, so the history is late under load, never starved.

use std::sync::mpsc;

use tokio::sync::oneshot;

/// The recorder thread's niceness (replication runs at the process's own, usually 0).
pub const NICE: i32 = 10;

type Job = Box<dyn FnOnce() + Send>;

/// A handle on the thread; it ends when the last handle is dropped.
#[derive(Clone)]
pub struct Worker {
    jobs: mpsc::Sender<Job>,
}

/// The job did not finish: it panicked, or the thread is gone.
#[derive(Debug)]
pub struct Gone;

impl Worker {
    /// Starts the thread `name`. Its priority is lowered where the system allows it (a warning
    /// otherwise: the recorder then competes with replication as any thread does).
    pub fn start(name: &str) -> std::io::Result<Worker> {
        let (jobs, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                if let Err(e) = crate::host::lower_this_threads_priority(NICE) {
                    tracing::warn!(error = %e, "the recorder runs at replication's priority");
                }
                for job in rx {
                    // A job that panics drops its answer (its caller sees `Gone`); the next
                    // ones still run.
                    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                }
            })?;
        Ok(Worker { jobs })
    }

    /// Runs `f` on the thread, after the jobs before it.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, Gone> {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = tx.send(f());
        });
        self.jobs.send(job).map_err(|_| Gone)?;
        rx.await.map_err(|_| Gone)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn niceness() -> i32 {
        // Field 19 of /proc/thread-self/stat; the name (field 2) may hold spaces, so count
        // from its closing parenthesis.
        let s = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
        let rest = &s[s.rfind(')').unwrap() + 2..];
        rest.split(' ').nth(16).unwrap().parse().unwrap()
    }

    #[tokio::test]
    async fn jobs_run_in_order_on_a_lower_priority_thread() {
        let w = Worker::start("test-recorder").unwrap();
        let mine = niceness();
        let theirs = w.run(niceness).await.unwrap();
        assert_eq!(theirs, (mine + NICE).min(19), "the worker's niceness");
        let order = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let runs: Vec<_> = (0..5)
            .map(|i| {
                let o = order.clone();
                w.run(move || o.lock().unwrap().push(i))
            })
            .collect();
        for r in runs {
            r.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), vec![0, 1, 2, 3, 4]);
        assert_eq!(niceness(), mine, "the caller's thread is untouched");
    }

    #[tokio::test]
    async fn a_job_that_panics_is_reported_and_the_next_runs() {
        let w = Worker::start("test-recorder").unwrap();
        let r = w.run(|| -> u8 { panic!("a failing job") }).await;
        assert!(r.is_err());
        assert_eq!(w.run(|| 7).await.unwrap(), 7, "the next job still runs");
    }
}
