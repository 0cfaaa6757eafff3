//! A scenario's scratch directory (the test kit's `TempDir`, removed with
//! everything in it on drop). In /dev/shm when there is one, so nginx's
//! uploaded files cost memory, not disk I/O that would add noise.

use std::path::Path;

use lattice_tests::TempDir;

pub fn scratch_dir(name: &str) -> TempDir {
    let shm = Path::new("/dev/shm");
    let base = if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    TempDir::at(base.join(name))
}
