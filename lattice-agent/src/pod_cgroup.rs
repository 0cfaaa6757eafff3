//! Finding a Kubernetes pod's cgroup v2 directory from its UID, for
//! `lattice-agent sidecar`.
//!
//! The kubelet names pod cgroups after the pod UID, in one of two layouts
//! depending on its cgroup driver (QoS class `burstable` or `besteffort`;
//! Guaranteed pods sit directly under the kubepods cgroup):
//!
//! | driver   | path under the cgroup v2 root                                          |
//! |----------|------------------------------------------------------------------------|
//! | systemd  | `kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid_>.slice`    |
//! | systemd  | `kubepods.slice/kubepods-pod<uid_>.slice` (Guaranteed)                  |
//! | cgroupfs | `kubepods/<qos>/pod<uid>`                                              |
//! | cgroupfs | `kubepods/pod<uid>` (Guaranteed)                                       |
//!
//! (`<uid_>` is the UID with `-` replaced by `_`: systemd reserves `-` in
//! slice names for nesting.)
//!
//! A container that shares the host's cgroup namespace sees its real path
//! in `/proc/self/cgroup`; that path is tried first, walking up from the
//! container's own cgroup to the directory named after the pod. Under a
//! private cgroup namespace (the default with cgroup v2) that line is just
//! `0::/` and the known layouts are searched under `--cgroup-root`, which is
//! the host's cgroup v2 tree mounted into the container (hostPath).

use std::path::{Component, Path, PathBuf};

/// QoS classes with their own level in the kubepods tree (Guaranteed pods
/// have none).
const QOS_CLASSES: [&str; 2] = ["burstable", "besteffort"];

#[derive(Debug, thiserror::Error)]
pub enum PodCgroupError {
    #[error(
        "--pod-uid {uid:?}: not a pod UID (expected letters, digits, '-' or '_', \
         e.g. from the downward API's metadata.uid)"
    )]
    InvalidUid { uid: String },
    #[error(
        "no cgroup directory for pod {pod_uid} under --cgroup-root {root}; searched:{}\n\
         (is --cgroup-root the host's cgroup v2 tree, e.g. a hostPath mount of \
         /sys/fs/cgroup, and POD_UID this pod's metadata.uid?)",
        list(searched)
    )]
    NotFound {
        pod_uid: String,
        root: PathBuf,
        searched: Vec<PathBuf>,
    },
}

fn list(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| format!("\n  {}", p.display()))
        .collect()
}

/// Returns the cgroup v2 directory of pod `pod_uid` under `cgroup_root`.
///
/// `proc_self_cgroup` is the content of `/proc/self/cgroup` (its `0::` line
/// is used when the container shares the host's cgroup namespace). The UID
/// may be given with `-` (as Kubernetes reports it) or `_` (as systemd
/// slice names spell it). Whether the directory is really on cgroup v2 is
/// checked later, when attaching.
pub fn find_pod_cgroup(
    cgroup_root: &Path,
    pod_uid: &str,
    proc_self_cgroup: &str,
) -> Result<PathBuf, PodCgroupError> {
    let uid = PodUid::parse(pod_uid)?;
    let mut searched = Vec::new();

    if let Some(relative) = own_pod_cgroup(proc_self_cgroup, &uid) {
        let candidate = cgroup_root.join(relative);
        if candidate.is_dir() {
            return Ok(candidate);
        }
        searched.push(candidate);
    }
    for relative in uid.known_layouts() {
        let candidate = cgroup_root.join(relative);
        if candidate.is_dir() {
            return Ok(candidate);
        }
        searched.push(candidate);
    }
    Err(PodCgroupError::NotFound {
        pod_uid: pod_uid.to_owned(),
        root: cgroup_root.to_owned(),
        searched,
    })
}

/// [`find_pod_cgroup`] with this process's own `/proc/self/cgroup`.
pub fn find_own_pod_cgroup(cgroup_root: &Path, pod_uid: &str) -> Result<PathBuf, PodCgroupError> {
    // Unreadable (no /proc): only the known layouts are searched.
    let proc_self_cgroup = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    find_pod_cgroup(cgroup_root, pod_uid, &proc_self_cgroup)
}

/// A pod UID in both spellings.
struct PodUid {
    /// With `-`, as in `metadata.uid` and cgroupfs-driver names.
    dashed: String,
    /// With `_`, as in systemd slice names.
    underscored: String,
}

impl PodUid {
    fn parse(raw: &str) -> Result<Self, PodCgroupError> {
        // Becomes part of a path: nothing that could climb out of the root.
        let valid = !raw.is_empty()
            && raw
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !valid {
            return Err(PodCgroupError::InvalidUid {
                uid: raw.to_owned(),
            });
        }
        Ok(Self {
            dashed: raw.replace('_', "-"),
            underscored: raw.replace('-', "_"),
        })
    }

    /// Every documented location, relative to the cgroup root: systemd
    /// driver first (the default on current EKS AMIs), then cgroupfs.
    fn known_layouts(&self) -> Vec<PathBuf> {
        let (d, u) = (&self.dashed, &self.underscored);
        let mut paths = Vec::with_capacity(6);
        for qos in QOS_CLASSES {
            paths.push(PathBuf::from(format!(
                "kubepods.slice/kubepods-{qos}.slice/kubepods-{qos}-pod{u}.slice"
            )));
        }
        paths.push(PathBuf::from(format!(
            "kubepods.slice/kubepods-pod{u}.slice"
        )));
        for qos in QOS_CLASSES {
            paths.push(PathBuf::from(format!("kubepods/{qos}/pod{d}")));
        }
        paths.push(PathBuf::from(format!("kubepods/pod{d}")));
        paths
    }

    fn named_in(&self, name: &str) -> bool {
        name.contains(&self.dashed) || name.contains(&self.underscored)
    }
}

/// From the `0::PATH` line (cgroup v2) of /proc/self/cgroup: the deepest
/// ancestor-or-self of PATH whose name contains the pod UID, relative to
/// the cgroup root. None under a private cgroup namespace (PATH is `/`, or
/// names no pod) or without a cgroup v2 line.
fn own_pod_cgroup(proc_self_cgroup: &str, uid: &PodUid) -> Option<PathBuf> {
    let path = proc_self_cgroup
        .lines()
        .find_map(|line| line.strip_prefix("0::"))?
        .trim_end();
    let path = Path::new(path);
    // Only plain names: a path outside our namespace's root shows as `/..`.
    let components: Vec<&str> = path
        .components()
        .filter(|c| !matches!(c, Component::RootDir))
        .map(|c| match c {
            Component::Normal(name) => name.to_str(),
            _ => None,
        })
        .collect::<Option<_>>()?;
    let pod_level = components.iter().rposition(|name| uid.named_in(name))?;
    Some(components[..=pod_level].iter().collect())
}

#[cfg(test)]
mod tests {
    use std::{
        fs,
        sync::atomic::{AtomicUsize, Ordering},
    };

    use super::*;

    const UID: &str = "8a1d4b5c-2f3e-4a6b-9c7d-0e1f2a3b4c5d";
    const UID_: &str = "8a1d4b5c_2f3e_4a6b_9c7d_0e1f2a3b4c5d";
    const PRIVATE_NS: &str = "0::/\n";

    /// A temporary directory standing in for the cgroup root.
    struct Tree(PathBuf);

    impl Tree {
        fn new() -> Self {
            static N: AtomicUsize = AtomicUsize::new(0);
            let dir = std::env::temp_dir().join(format!(
                "lattice-pod-cgroup-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }

        fn mkdir(&self, relative: &str) -> PathBuf {
            let path = self.0.join(relative);
            fs::create_dir_all(&path).unwrap();
            path
        }
    }

    impl Drop for Tree {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn systemd(qos: Option<&str>, uid_: &str) -> String {
        match qos {
            Some(q) => format!("kubepods.slice/kubepods-{q}.slice/kubepods-{q}-pod{uid_}.slice"),
            None => format!("kubepods.slice/kubepods-pod{uid_}.slice"),
        }
    }

    fn cgroupfs(qos: Option<&str>, uid: &str) -> String {
        match qos {
            Some(q) => format!("kubepods/{q}/pod{uid}"),
            None => format!("kubepods/pod{uid}"),
        }
    }

    #[test]
    fn systemd_driver_every_qos_class() {
        for qos in [Some("burstable"), Some("besteffort"), None] {
            let tree = Tree::new();
            // Siblings that must not match.
            tree.mkdir(&systemd(qos, "00000000_0000_0000_0000_000000000000"));
            let want = tree.mkdir(&systemd(qos, UID_));
            tree.mkdir(&format!("{}/cri-containerd-abc.scope", systemd(qos, UID_)));
            let got = find_pod_cgroup(&tree.0, UID, PRIVATE_NS).unwrap();
            assert_eq!(got, want, "qos {qos:?}");
        }
    }

    #[test]
    fn cgroupfs_driver_every_qos_class() {
        for qos in [Some("burstable"), Some("besteffort"), None] {
            let tree = Tree::new();
            tree.mkdir(&cgroupfs(qos, "00000000-0000-0000-0000-000000000000"));
            let want = tree.mkdir(&cgroupfs(qos, UID));
            tree.mkdir(&format!("{}/0123456789abcdef", cgroupfs(qos, UID)));
            let got = find_pod_cgroup(&tree.0, UID, PRIVATE_NS).unwrap();
            assert_eq!(got, want, "qos {qos:?}");
        }
    }

    #[test]
    fn uid_may_be_given_in_either_spelling() {
        let tree = Tree::new();
        let sd = tree.mkdir(&systemd(Some("burstable"), UID_));
        assert_eq!(find_pod_cgroup(&tree.0, UID_, PRIVATE_NS).unwrap(), sd);
        assert_eq!(find_pod_cgroup(&tree.0, UID, PRIVATE_NS).unwrap(), sd);

        let tree = Tree::new();
        let fs = tree.mkdir(&cgroupfs(Some("besteffort"), UID));
        assert_eq!(find_pod_cgroup(&tree.0, UID_, PRIVATE_NS).unwrap(), fs);
        assert_eq!(find_pod_cgroup(&tree.0, UID, PRIVATE_NS).unwrap(), fs);
    }

    #[test]
    fn static_pod_uid_without_dashes() {
        // Static pods' UIDs are a hex hash of the manifest.
        let uid = "5b2c4e0c3f1d9a8e7b6c5d4e3f2a1b0c";
        let tree = Tree::new();
        let want = tree.mkdir(&systemd(None, uid));
        assert_eq!(find_pod_cgroup(&tree.0, uid, PRIVATE_NS).unwrap(), want);
    }

    #[test]
    fn host_cgroup_namespace_walks_up_to_the_pod() {
        let tree = Tree::new();
        // A custom kubelet --cgroup-root no known layout covers.
        let pod = "kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/\
                   kubelet-kubepods-besteffort-pod"
            .to_owned()
            + UID_
            + ".slice";
        let want = tree.mkdir(&pod);
        tree.mkdir(&format!("{pod}/cri-containerd-0123.scope"));
        let proc_self = format!(
            "12:memory:/whatever\n1:name=systemd:/x\n0::/{pod}/cri-containerd-0123.scope\n"
        );
        assert_eq!(find_pod_cgroup(&tree.0, UID, &proc_self).unwrap(), want);
    }

    #[test]
    fn host_cgroup_namespace_cgroupfs_layout() {
        let tree = Tree::new();
        let want = tree.mkdir(&cgroupfs(Some("burstable"), UID));
        let proc_self = format!("0::/kubepods/burstable/pod{UID}/0123456789abcdef\n");
        assert_eq!(find_pod_cgroup(&tree.0, UID, &proc_self).unwrap(), want);
    }

    #[test]
    fn host_cgroup_namespace_naming_another_pod_falls_back_to_layouts() {
        let tree = Tree::new();
        let want = tree.mkdir(&systemd(Some("burstable"), UID_));
        let proc_self = "0::/kubepods.slice/kubepods-burstable.slice/\
                         kubepods-burstable-pod11111111_1111_1111_1111_111111111111.slice/c.scope\n";
        assert_eq!(find_pod_cgroup(&tree.0, UID, proc_self).unwrap(), want);
    }

    #[test]
    fn proc_self_cgroup_path_missing_under_root_is_listed_and_layouts_tried() {
        let tree = Tree::new();
        let proc_self = format!("0::/elsewhere/pod{UID}/c\n");
        let err = find_pod_cgroup(&tree.0, UID, &proc_self).unwrap_err();
        let PodCgroupError::NotFound { searched, .. } = &err else {
            panic!("{err}")
        };
        assert_eq!(searched[0], tree.0.join(format!("elsewhere/pod{UID}")));
        assert_eq!(searched.len(), 7);
    }

    #[test]
    fn cgroup_v1_only_lines_and_escaping_paths_are_ignored() {
        let tree = Tree::new();
        let want = tree.mkdir(&cgroupfs(None, UID));
        for proc_self in [
            format!("4:memory:/kubepods/pod{UID}\n"),
            format!("0::/../../kubepods/pod{UID}\n"),
            String::new(),
        ] {
            assert_eq!(find_pod_cgroup(&tree.0, UID, &proc_self).unwrap(), want);
        }
    }

    #[test]
    fn not_found_lists_every_path_searched() {
        let tree = Tree::new();
        tree.mkdir("kubepods.slice/kubepods-burstable.slice");
        let err = find_pod_cgroup(&tree.0, UID, PRIVATE_NS).unwrap_err();
        let message = err.to_string();
        for qos in [Some("burstable"), Some("besteffort"), None] {
            for relative in [systemd(qos, UID_), cgroupfs(qos, UID)] {
                let path = tree.0.join(relative);
                assert!(
                    message.contains(&path.display().to_string()),
                    "{path:?} missing from: {message}"
                );
            }
        }
        assert!(message.contains(UID), "{message}");
        assert!(message.contains("--cgroup-root"), "{message}");
    }

    #[test]
    fn a_file_is_not_a_pod_cgroup() {
        let tree = Tree::new();
        tree.mkdir("kubepods");
        fs::write(tree.0.join(format!("kubepods/pod{UID}")), "").unwrap();
        assert!(matches!(
            find_pod_cgroup(&tree.0, UID, PRIVATE_NS),
            Err(PodCgroupError::NotFound { .. })
        ));
    }

    #[test]
    fn uids_that_could_escape_the_root_are_rejected() {
        let tree = Tree::new();
        for bad in ["", "../x", "a/b", "pod uid", "."] {
            assert!(
                matches!(
                    find_pod_cgroup(&tree.0, bad, PRIVATE_NS),
                    Err(PodCgroupError::InvalidUid { .. })
                ),
                "{bad:?}"
            );
        }
    }
}
