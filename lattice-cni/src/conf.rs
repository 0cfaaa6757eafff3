//! Putting the plugin at the end of the node's plugin chain, and taking it
//! out again.
//!
//! Container runtimes (containerd, CRI-O) use the first file, by name, of
//! the CNI configuration directory. The node's own CNI (the VPC CNI's
//! `10-aws.conflist`, Calico, Cilium) writes it as a `.conflist`; the
//! plugin is appended to its `plugins`, after everything that gives the pod
//! its network, so the pod's addresses are in place when the agent enrolls
//! it. The primary CNI may rewrite its file at any time: [`install`] is
//! idempotent and cheap when nothing changed, so the agent calls it again
//! every few seconds.
//!
//! Files are replaced by rename (a runtime never reads half a file), keeping
//! their owner and mode.

use std::{
    fs,
    io::Write as _,
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The plugin's `type`: the binary's name in the CNI bin directory.
pub const PLUGIN_TYPE: &str = "lattice-cni";

/// What to do when the agent cannot be asked (down, restarting, too slow).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailurePolicy {
    /// Fail the pod's sandbox; the kubelet retries it. A pod that may call
    /// VPC Lattice never starts without interception.
    Fail,
    /// Let the pod start without interception: until the agent enrolls it
    /// from the API, its Lattice requests leave unsigned.
    Ignore,
}

/// The plugin's entry in the chain (its configuration).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PluginConf {
    /// Always [`PLUGIN_TYPE`].
    #[serde(rename = "type")]
    pub plugin_type: String,
    /// The agent's socket, as the runtime (the host) sees it.
    pub socket: PathBuf,
    pub failure_policy: FailurePolicy,
    /// Pods of these namespaces start without asking the agent: the agent's
    /// own, and the system's (which must start for the agent to run).
    pub exempt_namespaces: Vec<String>,
    /// How long the plugin waits for the agent's answer.
    pub timeout_seconds: u64,
}

impl PluginConf {
    pub fn new(socket: PathBuf, failure_policy: FailurePolicy, exempt: Vec<String>) -> Self {
        Self {
            plugin_type: PLUGIN_TYPE.to_owned(),
            socket,
            failure_policy,
            exempt_namespaces: exempt,
            timeout_seconds: 10,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfError {
    #[error(
        "no CNI configuration in {} yet (is the node's CNI installed?)",
        dir.display()
    )]
    NoConfig { dir: PathBuf },
    #[error(
        "{}: the runtime's CNI configuration is a single plugin, not a .conflist; \
         lattice-cni can only be chained into a plugin list",
        file.display()
    )]
    NotAList { file: PathBuf },
    #[error("{}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: not a CNI configuration", path.display())]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{}: `plugins` is not a list", path.display())]
    NoPlugins { path: PathBuf },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ConfError + '_ {
    move |source| ConfError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The result of [`install`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    /// The configuration file the runtime uses, now ending with the plugin.
    pub file: PathBuf,
    /// Whether it had to be written.
    pub changed: bool,
}

/// The file runtimes use: the first of `dir`'s `.conf`, `.conflist` and
/// `.json` files by name.
pub fn runtime_config_file(dir: &Path) -> Result<PathBuf, ConfError> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(io_err(dir))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("conf" | "conflist" | "json")
            ) && p.is_file()
        })
        .collect();
    files.sort();
    files.into_iter().next().ok_or_else(|| ConfError::NoConfig {
        dir: dir.to_owned(),
    })
}

/// Makes `entry` the last plugin of the runtime's configuration list in
/// `dir`, replacing any earlier entry of the plugin; writes only if that
/// changes the file.
pub fn install(dir: &Path, entry: &PluginConf) -> Result<Installed, ConfError> {
    let file = runtime_config_file(dir)?;
    if file.extension().and_then(|e| e.to_str()) != Some("conflist") {
        return Err(ConfError::NotAList { file });
    }
    let mut config = read_json(&file)?;
    let plugins = plugins_mut(&mut config, &file)?;
    let ours = serde_json::to_value(entry).expect("a plugin entry serializes");
    let already =
        plugins.last() == Some(&ours) && plugins.iter().filter(|p| is_ours(p)).count() == 1;
    if already {
        return Ok(Installed {
            file,
            changed: false,
        });
    }
    plugins.retain(|p| !is_ours(p));
    plugins.push(ours);
    write_json(&file, &config)?;
    Ok(Installed {
        file,
        changed: true,
    })
}

/// Takes the plugin out of every configuration list in `dir`; returns the
/// files changed.
pub fn uninstall(dir: &Path) -> Result<Vec<PathBuf>, ConfError> {
    let mut changed = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        let path = entry.map_err(io_err(dir))?.path();
        if path.extension().and_then(|e| e.to_str()) != Some("conflist") {
            continue;
        }
        let mut config = read_json(&path)?;
        let Ok(plugins) = plugins_mut(&mut config, &path) else {
            continue;
        };
        let before = plugins.len();
        plugins.retain(|p| !is_ours(p));
        if plugins.len() != before {
            write_json(&path, &config)?;
            changed.push(path);
        }
    }
    changed.sort();
    Ok(changed)
}

/// Copies the plugin binary to `<bin_dir>/lattice-cni` (mode 0755) unless
/// the same bytes are there; returns whether it wrote.
pub fn install_binary(plugin: &Path, bin_dir: &Path) -> Result<bool, ConfError> {
    let target = bin_dir.join(PLUGIN_TYPE);
    let bytes = fs::read(plugin).map_err(io_err(plugin))?;
    if fs::read(&target).is_ok_and(|old| old == bytes) {
        return Ok(false);
    }
    replace_file(&target, &bytes, 0o755, None)?;
    Ok(true)
}

fn is_ours(plugin: &Value) -> bool {
    plugin.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE)
}

fn plugins_mut<'a>(config: &'a mut Value, path: &Path) -> Result<&'a mut Vec<Value>, ConfError> {
    config
        .as_object_mut()
        .and_then(|o: &mut Map<String, Value>| o.get_mut("plugins"))
        .and_then(Value::as_array_mut)
        .ok_or_else(|| ConfError::NoPlugins {
            path: path.to_owned(),
        })
}

fn read_json(path: &Path) -> Result<Value, ConfError> {
    let bytes = fs::read(path).map_err(io_err(path))?;
    serde_json::from_slice(&bytes).map_err(|source| ConfError::Json {
        path: path.to_owned(),
        source,
    })
}

/// Rewrites `path` with `config`, keeping its owner and mode.
fn write_json(path: &Path, config: &Value) -> Result<(), ConfError> {
    let meta = fs::metadata(path).map_err(io_err(path))?;
    let mut bytes = serde_json::to_vec_pretty(config).expect("JSON serializes");
    bytes.push(b'\n');
    replace_file(
        path,
        &bytes,
        meta.permissions().mode() & 0o7777,
        Some((meta.uid(), meta.gid())),
    )
}

/// Writes a temporary file beside `path`, gives it `mode` (and `owner`),
/// and renames it over `path`.
fn replace_file(
    path: &Path,
    bytes: &[u8],
    mode: u32,
    owner: Option<(u32, u32)>,
) -> Result<(), ConfError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    // A dot file with a suffix runtimes ignore, unique to this process.
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::fchown(&f, Some(uid), Some(gid))?;
        }
        f.sync_all()?;
        fs::rename(&tmp, path)
    };
    write().map_err(|source| {
        let _ = fs::remove_file(&tmp);
        ConfError::Io {
            path: path.to_owned(),
            source,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> PluginConf {
        PluginConf::new(
            "/var/run/lattice/cni.sock".into(),
            FailurePolicy::Fail,
            vec!["kube-system".into(), "lattice-system".into()],
        )
    }

    /// The VPC CNI's list, as aws-node writes it (trimmed).
    fn aws_conflist() -> Value {
        serde_json::json!({
            "cniVersion": "0.4.0",
            "name": "aws-cni",
            "disableCheck": true,
            "plugins": [
                {"name": "aws-cni", "type": "aws-cni", "vethPrefix": "eni", "mtu": "9001"},
                {"name": "egress-cni", "type": "egress-cni", "enabled": "false"},
                {"type": "portmap", "capabilities": {"portMappings": true}, "snat": true}
            ]
        })
    }

    fn write(dir: &Path, name: &str, v: &Value) -> PathBuf {
        let p = dir.join(name);
        fs::write(&p, serde_json::to_vec_pretty(v).unwrap()).unwrap();
        p
    }

    fn plugins(path: &Path) -> Vec<Value> {
        read_json(path).unwrap()["plugins"]
            .as_array()
            .unwrap()
            .clone()
    }

    #[test]
    fn appends_last_once_and_keeps_everything_else() {
        let dir = tempfile::tempdir().unwrap();
        let file = write(dir.path(), "10-aws.conflist", &aws_conflist());
        fs::set_permissions(&file, fs::Permissions::from_mode(0o600)).unwrap();
        write(dir.path(), "20-other.conflist", &aws_conflist());

        let first = install(dir.path(), &entry()).unwrap();
        assert_eq!(
            first,
            Installed {
                file: file.clone(),
                changed: true
            }
        );
        let after = read_json(&file).unwrap();
        let list = plugins(&file);
        assert_eq!(list.len(), 4);
        assert_eq!(list[..3], aws_conflist()["plugins"].as_array().unwrap()[..]);
        assert_eq!(list[3], serde_json::to_value(entry()).unwrap());
        assert_eq!(after["disableCheck"], true, "other keys kept");
        assert_eq!(
            fs::metadata(&file).unwrap().permissions().mode() & 0o777,
            0o600,
            "mode kept"
        );
        // Only the runtime's file.
        assert_eq!(plugins(&dir.path().join("20-other.conflist")).len(), 3);

        let again = install(dir.path(), &entry()).unwrap();
        assert!(!again.changed, "idempotent");
        assert_eq!(plugins(&file).len(), 4);
    }

    #[test]
    fn comes_back_when_the_primary_rewrites_its_file_and_updates_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let file = write(dir.path(), "10-aws.conflist", &aws_conflist());
        install(dir.path(), &entry()).unwrap();
        // The primary CNI rewrites its file without us.
        write(dir.path(), "10-aws.conflist", &aws_conflist());
        assert!(install(dir.path(), &entry()).unwrap().changed);
        assert_eq!(plugins(&file).len(), 4);

        // A new setting replaces the entry rather than adding one; an entry
        // not last (something appended after it) moves to the end.
        let mut changed = entry();
        changed.failure_policy = FailurePolicy::Ignore;
        let mut conf = read_json(&file).unwrap();
        conf["plugins"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({"type": "bandwidth"}));
        write(dir.path(), "10-aws.conflist", &conf);
        install(dir.path(), &changed).unwrap();
        let list = plugins(&file);
        assert_eq!(list.iter().filter(|p| is_ours(p)).count(), 1);
        assert_eq!(list.last().unwrap()["failurePolicy"], "ignore");
        assert_eq!(list[list.len() - 2]["type"], "bandwidth");
    }

    #[test]
    fn uninstall_takes_it_out_of_every_list() {
        let dir = tempfile::tempdir().unwrap();
        let a = write(dir.path(), "10-aws.conflist", &aws_conflist());
        install(dir.path(), &entry()).unwrap();
        let mut stale = aws_conflist();
        stale["plugins"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::to_value(entry()).unwrap());
        let b = write(dir.path(), "20-old.conflist", &stale);
        assert_eq!(uninstall(dir.path()).unwrap(), vec![a.clone(), b.clone()]);
        assert_eq!(read_json(&a).unwrap(), aws_conflist());
        assert_eq!(read_json(&b).unwrap(), aws_conflist());
        assert!(uninstall(dir.path()).unwrap().is_empty());
    }

    #[test]
    fn the_runtime_file_is_the_first_by_name() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            install(dir.path(), &entry()),
            Err(ConfError::NoConfig { .. })
        ));
        fs::write(dir.path().join("README"), "not a config").unwrap();
        write(dir.path(), "20-b.conflist", &aws_conflist());
        let single = write(
            dir.path(),
            "05-bridge.conf",
            &serde_json::json!({"cniVersion": "1.0.0", "name": "n", "type": "bridge"}),
        );
        match install(dir.path(), &entry()) {
            Err(ConfError::NotAList { file }) => assert_eq!(file, single),
            other => panic!("{other:?}"),
        }
        fs::remove_file(&single).unwrap();
        assert_eq!(
            install(dir.path(), &entry()).unwrap().file,
            dir.path().join("20-b.conflist")
        );
    }

    #[test]
    fn binary_copied_once() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("plugin");
        fs::write(&src, b"\x7fELF...").unwrap();
        let bin = dir.path().join("bin");
        fs::create_dir(&bin).unwrap();
        assert!(install_binary(&src, &bin).unwrap());
        assert!(!install_binary(&src, &bin).unwrap());
        let meta = fs::metadata(bin.join(PLUGIN_TYPE)).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o755);
        fs::write(&src, b"\x7fELF v2").unwrap();
        assert!(install_binary(&src, &bin).unwrap());
        assert_eq!(fs::read(bin.join(PLUGIN_TYPE)).unwrap(), b"\x7fELF v2");
    }
}
