//! One suite for every `Storage`: the simulated disk must behave like the
//! real one (crashes aside), or WAL tests on it prove nothing.

use harbor_wal::{FileStorage, MemStorage, Storage};
use std::io::ErrorKind;

fn sorted_list(storage: &impl Storage) -> Vec<String> {
    let mut names = storage.list().unwrap();
    names.sort();
    names
}

fn conformance(mut s: impl Storage) {
    assert!(s.list().unwrap().is_empty());
    s.create("a").unwrap();
    s.append("a", b"hello ").unwrap();
    s.append("a", b"world").unwrap();
    s.sync("a").unwrap();
    assert_eq!(s.read("a").unwrap(), b"hello world");
    assert_eq!(s.read_at("a", 6, 5).unwrap(), b"world");
    assert_eq!(
        s.read_at("a", 6, 6).unwrap_err().kind(),
        ErrorKind::UnexpectedEof
    );

    // Appends after a cut land at the new end.
    s.set_len("a", 5).unwrap();
    s.append("a", b"!").unwrap();
    assert_eq!(s.read("a").unwrap(), b"hello!");
    s.set_len("a", 8).unwrap();
    assert_eq!(s.read("a").unwrap(), b"hello!\0\0");

    // create replaces.
    s.create("b").unwrap();
    s.append("b", b"old").unwrap();
    s.create("b").unwrap();
    assert_eq!(s.read("b").unwrap(), b"");

    s.rename("a", "b").unwrap();
    assert_eq!(sorted_list(&s), ["b"]);
    assert_eq!(s.read("b").unwrap(), b"hello!\0\0");
    s.append("b", b"?").unwrap();
    s.sync("b").unwrap();
    assert_eq!(s.read("b").unwrap(), b"hello!\0\0?");

    // Preallocated zeros are read back, and appends overwrite them from
    // the end; a file that is long enough already is left alone.
    s.create("c").unwrap();
    s.append("c", b"ab").unwrap();
    s.preallocate("c", 6).unwrap();
    assert_eq!(s.read("c").unwrap(), b"ab\0\0\0\0");
    s.append("c", b"cd").unwrap();
    assert_eq!(s.read("c").unwrap(), b"abcd\0\0");
    s.preallocate("c", 3).unwrap();
    s.append("c", b"efgh").unwrap();
    assert_eq!(s.read("c").unwrap(), b"abcdefgh");
    s.preallocate("c", 10).unwrap();
    s.set_len("c", 3).unwrap();
    s.append("c", b"!").unwrap();
    s.sync("c").unwrap();
    assert_eq!(s.read("c").unwrap(), b"abc!");
    s.remove("c").unwrap();

    s.remove("b").unwrap();
    s.sync_dir().unwrap();
    assert!(s.list().unwrap().is_empty());
    assert_eq!(s.read("b").unwrap_err().kind(), ErrorKind::NotFound);
    assert!(s.remove("b").is_err());
    assert!(s.append("missing", b"x").is_err());
}

#[test]
fn file_storage_conforms() {
    let dir = tempfile::tempdir().unwrap();
    conformance(FileStorage::new(dir.path().join("wal")).unwrap());
}

#[test]
fn mem_storage_conforms() {
    conformance(MemStorage::new());
}

#[test]
fn mem_storage_crash_keeps_synced_state_and_drops_unsynced() {
    let disk = MemStorage::new();
    let mut s = disk.clone();
    s.create("durable").unwrap();
    s.append("durable", b"kept").unwrap();
    s.sync("durable").unwrap();
    s.sync_dir().unwrap();
    s.append("durable", b" lost").unwrap();
    s.create("unlinked").unwrap();
    s.sync("unlinked").unwrap();
    for seed in 0..32 {
        let copy = MemStorage::new();
        let mut c = copy.clone();
        c.create("durable").unwrap();
        c.append("durable", b"kept").unwrap();
        c.sync("durable").unwrap();
        c.sync_dir().unwrap();
        c.append("durable", b" lost").unwrap();
        copy.crash(seed, false);
        assert_eq!(copy.read("durable").unwrap(), b"kept", "seed {seed}");
    }
    // Unsynced directory entries sometimes survive, sometimes not.
    let mut outcomes = std::collections::BTreeSet::new();
    for seed in 0..32 {
        let copy = MemStorage::new();
        let mut c = copy.clone();
        c.create("new").unwrap();
        c.sync("new").unwrap();
        copy.crash(seed, false);
        outcomes.insert(copy.list().unwrap().len());
    }
    assert_eq!(outcomes.into_iter().collect::<Vec<_>>(), [0, 1]);
    disk.crash(0, false);
    assert_eq!(disk.read("durable").unwrap(), b"kept");
}

#[test]
fn mem_storage_fault_injection() {
    let disk = MemStorage::new();
    let mut s = disk.clone();
    s.create("f").unwrap();
    s.sync_dir().unwrap();
    disk.fail_next_sync();
    assert!(s.sync("f").is_err());
    s.sync("f").unwrap();
    let done = disk.ops_count();
    disk.fail_writes_after(1);
    s.append("f", b"x").unwrap();
    assert!(s.append("f", b"y").is_err());
    assert!(s.sync_dir().is_err());
    assert_eq!(disk.ops_count(), done + 1);
    disk.crash(0, false);
    s.append("f", b"z").unwrap();
}
