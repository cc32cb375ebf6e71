//! Small files replaced whole or not at all (markers, checkpoints, the
//! metadata voter's state, a gateway's saved projection): the one way every
//! plane writes them, so a crash leaves the old file or the new one.

use std::fs::File;
use std::io::{self, Write};
use std::path::Path;

/// Replaces `path` with `parts`, written one after the other: a temp file
/// beside it (`NAME.tmp`), fsynced, renamed over it, and the directory
/// fsynced. A crash at any point leaves the old content or the new one
/// (and perhaps the temp file, which the next write replaces).
pub fn replace(path: &Path, parts: &[&[u8]]) -> io::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "a file to replace needs a name",
        )
    })?;
    let mut temp_name = name.to_os_string();
    temp_name.push(".tmp");
    let temp = dir.join(temp_name);
    let mut file = File::create(&temp)?;
    for part in parts {
        file.write_all(part)?;
    }
    file.sync_all()?;
    drop(file);
    std::fs::rename(&temp, path)?;
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_the_whole_file_and_leaves_no_temp() {
        let dir = std::env::temp_dir().join(format!("harbor-durable-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state");
        replace(&path, &[b"old"]).unwrap();
        replace(&path, &[b"new ", b"parts"]).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new parts");
        assert!(!dir.join("state.tmp").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
