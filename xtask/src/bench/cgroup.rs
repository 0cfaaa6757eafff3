//! The bench's cgroup v2 tree: `<mount>/lat-…/{app,agent,upstream,empty}`
//! (the test kit's `CgroupTree`: on drop every process in it is killed and
//! the directories removed). `app` is the pod cgroup the load generator
//! runs in; `empty` is where the iptables scenario's agent attaches, so its
//! programs see no traffic.

use std::path::{Path, PathBuf};

use lattice_tests::cgroup::{CgroupTree, cgroup2_mount};

const CHILDREN: [&str; 4] = ["app", "agent", "upstream", "empty"];

pub struct Cgroups(CgroupTree);

impl Cgroups {
    pub fn new(name: &str) -> Self {
        let tree = CgroupTree::new(cgroup2_mount().join(name));
        for child in CHILDREN {
            tree.mkdir(child);
        }
        Self(tree)
    }

    pub fn root(&self) -> &Path {
        self.0.path()
    }
    pub fn app(&self) -> PathBuf {
        self.root().join("app")
    }
    pub fn agent(&self) -> PathBuf {
        self.root().join("agent")
    }
    pub fn upstream(&self) -> PathBuf {
        self.root().join("upstream")
    }
    pub fn empty(&self) -> PathBuf {
        self.root().join("empty")
    }
}
