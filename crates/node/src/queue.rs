//! A bounded multi-producer queue that allocates as it fills.
//!
//! `std::sync::mpsc::sync_channel(n)` allocates all `n` slots up front; with
//! dozens of replicas per process and generous bounds that is gigabytes of
//! idle memory. This wraps the list-based unbounded channel with a counter.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::time::Duration;

pub struct Sender<T> {
    tx: mpsc::Sender<T>,
    len: Arc<AtomicUsize>,
    capacity: usize,
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        Sender {
            tx: self.tx.clone(),
            len: self.len.clone(),
            capacity: self.capacity,
        }
    }
}

pub struct Receiver<T> {
    rx: mpsc::Receiver<T>,
    len: Arc<AtomicUsize>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum TrySendError {
    Full,
    Disconnected,
}

pub fn bounded<T>(capacity: usize) -> (Sender<T>, Receiver<T>) {
    assert!(capacity > 0, "a queue needs room for one item");
    let (tx, rx) = mpsc::channel();
    let len = Arc::new(AtomicUsize::new(0));
    (
        Sender {
            tx,
            len: len.clone(),
            capacity,
        },
        Receiver { rx, len },
    )
}

impl<T> Sender<T> {
    /// Queues `item` unless the queue is full or the receiver is gone.
    pub fn try_send(&self, item: T) -> Result<(), TrySendError> {
        if self.len.fetch_add(1, Ordering::AcqRel) >= self.capacity {
            self.len.fetch_sub(1, Ordering::AcqRel);
            return Err(TrySendError::Full);
        }
        self.tx.send(item).map_err(|_| {
            self.len.fetch_sub(1, Ordering::AcqRel);
            TrySendError::Disconnected
        })
    }

    /// Queues `item` even past the bound: for the few control messages that
    /// must never be dropped.
    pub fn force_send(&self, item: T) -> Result<(), TrySendError> {
        self.len.fetch_add(1, Ordering::AcqRel);
        self.tx.send(item).map_err(|_| {
            self.len.fetch_sub(1, Ordering::AcqRel);
            TrySendError::Disconnected
        })
    }
}

impl<T> Receiver<T> {
    pub fn recv_timeout(&self, timeout: Duration) -> Result<T, RecvTimeoutError> {
        let item = self.rx.recv_timeout(timeout)?;
        self.len.fetch_sub(1, Ordering::AcqRel);
        Ok(item)
    }

    pub fn try_recv(&self) -> Option<T> {
        let item = self.rx.try_recv().ok()?;
        self.len.fetch_sub(1, Ordering::AcqRel);
        Some(item)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_past_capacity_and_frees_room_on_receive() {
        let (tx, rx) = bounded(2);
        assert_eq!(tx.try_send(1), Ok(()));
        assert_eq!(tx.try_send(2), Ok(()));
        assert_eq!(tx.try_send(3), Err(TrySendError::Full));
        assert_eq!(tx.force_send(4), Ok(()));
        assert_eq!(rx.try_recv(), Some(1));
        assert_eq!(rx.try_recv(), Some(2));
        assert_eq!(rx.try_recv(), Some(4));
        assert_eq!(tx.try_send(5), Ok(()));
        drop(rx);
        assert_eq!(tx.try_send(6), Err(TrySendError::Disconnected));
    }
}
