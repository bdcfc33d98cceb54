//! Worker threads, each with an async runtime of its own (Envoy's and
//! ztunnel's thread-per-core model): a connection a worker accepts is
//! served there from start to end, with every task it spawns, and the
//! connections it opens (upstreams, tunnels) are pooled per worker. A
//! request's hand-offs between tasks — client connection, upstream
//! connection, tunnel connection — then stay on one thread: no wake-up of a
//! parked sibling thread, no work stolen across cores, no inter-processor
//! interrupt per hand-off. Every worker accepts on the same listening
//! sockets; the kernel wakes each, and the one not busy takes the
//! connection.

use std::{cell::Cell, future::Future, io, thread::JoinHandle};

use tokio::sync::mpsc;

thread_local! {
    static INDEX: Cell<usize> = const { Cell::new(0) };
}

/// The worker this thread is; 0 on any other thread (the control runtime,
/// tests), which then shares the first worker's pools.
pub fn current() -> usize {
    INDEX.with(Cell::get)
}

/// The running workers.
pub struct Workers {
    threads: Vec<JoinHandle<()>>,
    /// A worker's index once its job has ended (or its thread unwound).
    ended: mpsc::UnboundedReceiver<usize>,
    running: usize,
}

/// Tells the owner that a worker ended, also when its job panicked.
struct Ended(usize, mpsc::UnboundedSender<usize>);

impl Drop for Ended {
    fn drop(&mut self) {
        let _ = self.1.send(self.0);
    }
}

impl Workers {
    /// Starts `count` workers (at least one). For each, `make(index)` runs
    /// here and gives the job the worker's thread runs: a closure that
    /// builds the worker's future inside its runtime (so the sockets it
    /// registers belong to that worker).
    pub fn start<M, J, F>(count: usize, mut make: M) -> io::Result<Self>
    where
        M: FnMut(usize) -> J,
        J: FnOnce() -> F + Send + 'static,
        F: Future<Output = ()> + 'static,
    {
        let (tell, ended) = mpsc::unbounded_channel();
        let mut threads = Vec::new();
        for index in 0..count.max(1) {
            let job = make(index);
            let ended = Ended(index, tell.clone());
            // The runtime is built (and dropped) on the worker's own
            // thread; whether it could be built comes back here.
            let (built_tx, built) = std::sync::mpsc::sync_channel(1);
            let thread = std::thread::Builder::new()
                .name(format!("meshd-worker-{index}"))
                .spawn(move || {
                    let _ended = ended;
                    let runtime = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(runtime) => runtime,
                        Err(err) => {
                            let _ = built_tx.send(Err(err));
                            return;
                        }
                    };
                    let _ = built_tx.send(Ok(()));
                    INDEX.with(|i| i.set(index));
                    runtime.block_on(job());
                    // Dropping the runtime here ends what the job left
                    // running (pooled connections' tasks) on this thread.
                })?;
            match built.recv() {
                Ok(Ok(())) => {}
                Ok(Err(err)) => return Err(err),
                Err(_) => return Err(io::Error::other("a worker thread ended at its start")),
            }
            threads.push(thread);
        }
        Ok(Self {
            running: threads.len(),
            threads,
            ended,
        })
    }

    /// How many workers were started.
    pub fn count(&self) -> usize {
        self.threads.len()
    }

    /// Resolves when a worker's job ends; pending forever once all have.
    pub async fn one_ended(&mut self) -> usize {
        if self.running == 0 {
            return std::future::pending().await;
        }
        match self.ended.recv().await {
            Some(index) => {
                self.running -= 1;
                index
            }
            None => std::future::pending().await,
        }
    }

    /// Waits for every worker's job to end and its thread to exit.
    pub async fn join(mut self) {
        while self.running > 0 {
            self.one_ended().await;
        }
        // Their jobs have ended; each thread is dropping its runtime.
        let threads = self.threads;
        let _ = tokio::task::spawn_blocking(move || {
            for thread in threads {
                let _ = thread.join();
            }
        })
        .await;
    }
}

/// One `T` per worker, made on first use: what each worker pools for
/// itself behind one lock.
pub struct PerWorker<T>(Vec<T>);

impl<T> Default for PerWorker<T> {
    fn default() -> Self {
        Self(Vec::new())
    }
}

impl<T: Default> PerWorker<T> {
    /// This thread's worker's `T`.
    pub fn mine(&mut self) -> &mut T {
        self.of(current())
    }

    /// Worker `index`'s `T`.
    pub fn of(&mut self, index: usize) -> &mut T {
        if self.0.len() <= index {
            self.0.resize_with(index + 1, T::default);
        }
        &mut self.0[index]
    }

    /// Every worker's `T`.
    pub fn all(&mut self) -> impl Iterator<Item = &mut T> {
        self.0.iter_mut()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn each_worker_runs_its_job_on_a_thread_of_its_own_and_knows_its_index() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let workers = Workers::start(3, |index| {
            let tx = tx.clone();
            move || async move {
                // Spawned tasks run on the worker's own thread too.
                let spawned = tokio::spawn(async { (current(), std::thread::current().id()) })
                    .await
                    .expect("spawned task");
                let _ = tx.send((index, current(), std::thread::current().id(), spawned));
            }
        })
        .expect("workers");
        assert_eq!(workers.count(), 3);
        workers.join().await;
        drop(tx);
        let mut seen = Vec::new();
        while let Some((index, current, thread, spawned)) = rx.recv().await {
            assert_eq!(index, current, "the thread-local index is the worker's");
            assert_eq!(
                spawned,
                (current, thread),
                "a spawned task stays on its worker"
            );
            assert_ne!(thread, std::thread::current().id());
            seen.push((index, thread));
        }
        seen.sort_by_key(|(index, _)| *index);
        assert_eq!(seen.iter().map(|(i, _)| *i).collect::<Vec<_>>(), [0, 1, 2]);
        let mut threads: Vec<_> = seen.iter().map(|(_, t)| format!("{t:?}")).collect();
        threads.dedup();
        assert_eq!(threads.len(), 3, "one thread per worker");
        assert_eq!(current(), 0, "outside the workers");
    }

    #[tokio::test]
    async fn a_panicking_job_still_counts_as_ended() {
        let mut workers = Workers::start(2, |index| {
            move || async move {
                if index == 1 {
                    panic!("worker 1 fails");
                }
            }
        })
        .expect("workers");
        let mut ended = [workers.one_ended().await, workers.one_ended().await];
        ended.sort();
        assert_eq!(ended, [0, 1]);
        workers.join().await;
    }

    #[test]
    fn per_worker_values_are_apart_and_made_on_first_use() {
        let mut pools: PerWorker<Vec<u8>> = PerWorker::default();
        pools.of(2).push(2);
        pools.mine().push(0);
        assert_eq!(pools.of(0), &[0]);
        assert_eq!(pools.of(1), &[] as &[u8]);
        assert_eq!(pools.of(2), &[2]);
        assert_eq!(pools.all().count(), 3);
    }
}
