//! The fuzz targets' properties.

use std::{
    borrow::Cow,
    ffi::OsString,
    os::unix::ffi::OsStringExt as _,
    path::{Path, PathBuf},
    sync::OnceLock,
    time::Duration,
};

use lattice_cni::{
    conf::{self, FailurePolicy, PluginConf},
    frame::{FrameError, Lines},
    plugin::{
        CniCommand, Code, Env,
        env::{self, parse_args},
        netconf::{NetConf, SUPPORTED_VERSIONS},
    },
    protocol,
};
use serde_json::Value;

use crate::{handover, query, uri_path};

// ------------------------------------------------------------ canonical

/// The request target `data` (path, then `?` and the query, as hyper
/// hands them over): the canonical path and query SigV4 signs.
pub fn canonical(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (path, raw_query) = text.split_once('?').unwrap_or((text, ""));
    check_path(path);
    check_query(raw_query);
}

fn check_path(path: &str) {
    let normalized = uri_path::normalized_path(path);
    assert!(normalized.starts_with('/'), "{path:?} -> {normalized:?}");
    assert_eq!(
        uri_path::normalized_path(&normalized),
        normalized,
        "normalising is idempotent ({path:?})"
    );
    if normalized != "/" {
        let inner = normalized[1..]
            .strip_suffix('/')
            .unwrap_or(&normalized[1..]);
        for segment in inner.split('/') {
            assert!(
                !matches!(segment, "" | "." | ".."),
                "{path:?} -> {normalized:?} keeps segment {segment:?}"
            );
        }
    }
    // A trailing `/` survives exactly when something is left before it.
    assert_eq!(
        normalized.len() > 1 && normalized.ends_with('/'),
        path.ends_with('/') && normalized != "/",
        "{path:?} -> {normalized:?}"
    );
    let canonical = uri_path::canonical_path(path);
    assert_encoded(&canonical, true);
    assert_eq!(
        percent_decode(&canonical),
        normalized.as_bytes(),
        "the canonical path encodes the normalised one ({path:?})"
    );
}

fn check_query(raw: &str) {
    let Ok(wire) = query::wire_query(raw) else {
        assert!(query::canonical_query(raw).is_err(), "{raw:?}");
        return;
    };
    // The wire form is its own wire form: every pair canonical (kept as
    // is, borrowed; only an empty query is always rebuilt, as nothing).
    match query::wire_query(&wire) {
        Ok(Cow::Borrowed(again)) => assert_eq!(again, wire),
        Ok(Cow::Owned(again)) => assert!(again.is_empty() && wire.is_empty(), "{wire:?}"),
        Err(e) => panic!("{raw:?} -> {wire:?}: {e}"),
    }
    let raw_pairs: Vec<&str> = raw.split('&').filter(|s| !s.is_empty()).collect();
    let wire_pairs: Vec<&str> = wire.split('&').filter(|s| !s.is_empty()).collect();
    assert_eq!(wire_pairs.len(), raw_pairs.len(), "{raw:?} -> {wire:?}");
    assert!(
        wire.is_empty() || wire.split('&').all(|s| !s.is_empty()),
        "{wire:?} has an empty segment"
    );
    for (sent, fwd) in raw_pairs.iter().zip(&wire_pairs) {
        // Same order, same shape (a bare name stays bare).
        assert_eq!(sent.contains('='), fwd.contains('='), "{sent:?} -> {fwd:?}");
        let (name, value) = fwd.split_once('=').unwrap_or((fwd, ""));
        assert_encoded(name, false);
        assert_encoded(value, false);
    }
    let canonical = query::canonical_query(raw).expect("wire_query accepted it");
    assert_eq!(
        query::canonical_query(&wire).unwrap(),
        canonical,
        "{raw:?}: the wire form signs the same"
    );
    assert_eq!(
        query::canonical_query(&canonical).unwrap(),
        canonical,
        "canonical_query is idempotent ({raw:?})"
    );
    let pairs: Vec<(&str, &str)> = canonical
        .split('&')
        .filter(|s| !s.is_empty())
        .map(|p| p.split_once('=').expect("name=value"))
        .collect();
    assert!(pairs.is_sorted(), "{canonical:?} is not sorted");
}

/// Only unreserved bytes (and `/` in paths), or `%XX` with uppercase hex
/// of a byte that is not unreserved.
fn assert_encoded(s: &str, path: bool) {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b.get(i + 1..i + 3).expect("% followed by two digits");
            assert!(
                hex.iter()
                    .all(|h| h.is_ascii_digit() || (b'A'..=b'F').contains(h)),
                "{s:?}"
            );
            let byte = u8::from_str_radix(std::str::from_utf8(hex).unwrap(), 16).unwrap();
            assert!(!query::is_unreserved(byte), "{s:?} escapes {byte:#x}");
            i += 3;
        } else {
            assert!(
                query::is_unreserved(b[i]) || (path && b[i] == b'/'),
                "{s:?} has {:?} unescaped",
                char::from(b[i])
            );
            i += 1;
        }
    }
}

fn percent_decode(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && let Some(byte) = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(byte);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

// -------------------------------------------------------------- CNI plugin

const COMMANDS: [CniCommand; 6] = [
    CniCommand::Add,
    CniCommand::Del,
    CniCommand::Check,
    CniCommand::Status,
    CniCommand::Gc,
    CniCommand::Version,
];

/// The network configuration on the plugin's stdin.
pub fn cni_netconf(data: &[u8]) {
    match NetConf::parse(data) {
        Ok(conf) => {
            assert!(SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()));
            assert!(conf.timeout() >= Duration::from_secs(1));
            for command in COMMANDS {
                if let Err(e) = conf.allows(command) {
                    assert_eq!(e.code, Code::IncompatibleVersion);
                    assert_eq!(e.to_json()["cniVersion"], conf.cni_version.as_str());
                }
            }
            match conf.passthrough() {
                Ok(result) => {
                    assert!(result.is_object());
                    assert_eq!(result["cniVersion"], conf.cni_version.as_str());
                }
                Err(e) => {
                    assert_eq!(e.code, Code::InvalidConfig);
                    assert_eq!(e.to_json()["cniVersion"], conf.cni_version.as_str());
                }
            }
        }
        Err(e) => {
            let json = e.to_json();
            assert!(json["code"].is_u64() && json["cniVersion"].is_string());
            assert!(!e.msg.is_empty());
        }
    }
}

/// The runtime's `CNI_*` variables: `data` split at NUL bytes into
/// `CNI_COMMAND`, `CNI_CONTAINERID`, `CNI_NETNS`, `CNI_IFNAME`, `CNI_ARGS`
/// (fewer parts: the rest unset).
pub fn cni_env(data: &[u8]) {
    let names = [
        env::COMMAND,
        env::CONTAINER_ID,
        env::NETNS,
        env::IFNAME,
        env::ARGS,
    ];
    let values: Vec<&[u8]> = data.split(|b| *b == 0).collect();
    let lookup = |name: &str| {
        let i = names.iter().position(|n| *n == name)?;
        values.get(i).map(|v| OsString::from_vec(v.to_vec()))
    };
    let env = match Env::from_lookup(lookup) {
        Ok(env) => env,
        Err(e) => {
            assert_eq!(e.code, Code::InvalidEnvironment);
            assert!(values.iter().any(|v| std::str::from_utf8(v).is_err()));
            return;
        }
    };
    if let Ok(command) = env.command() {
        assert_eq!(Some(command.name()), env.get(env::COMMAND));
    }
    let args = env.get(env::ARGS).unwrap_or("");
    match (parse_args(args), env.pod()) {
        (Ok(pairs), Ok(pod)) => {
            let items = args.split(';').filter(|i| !i.is_empty()).count();
            assert_eq!(pairs.len(), items, "{args:?}");
            for (k, v) in &pairs {
                assert!(!k.contains(['=', ';']) && !v.contains(';'), "{args:?}");
            }
            let last = |key: &str| {
                pairs
                    .iter()
                    .rev()
                    .find(|(k, _)| *k == key)
                    .map_or("", |(_, v)| *v)
            };
            match pod {
                Some(pod) => {
                    assert!(!pod.namespace.is_empty());
                    assert_eq!(pod.namespace, last("K8S_POD_NAMESPACE"));
                    assert_eq!(pod.name, last("K8S_POD_NAME"));
                    assert_eq!(pod.uid, last("K8S_POD_UID"));
                }
                None => assert_eq!(last("K8S_POD_NAMESPACE"), ""),
            }
        }
        (Err(_), Err(e)) => assert_eq!(e.code, Code::InvalidEnvironment),
        (args, pod) => panic!("parse_args {args:?} but pod {pod:?}"),
    }
}

/// A directory of this process's own for [`cni_conflist`], on tmpfs where
/// there is one (the plugin's files are synced on every write).
fn conf_dir() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let shm = Path::new("/dev/shm");
        let base = if shm.is_dir() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        tempfile::Builder::new()
            .prefix("lattice-fuzz-")
            .tempdir_in(base)
            .expect("a temporary directory")
    })
    .path()
}

fn plugins(config: &Value) -> Vec<Value> {
    config["plugins"].as_array().cloned().unwrap_or_default()
}

fn is_ours(plugin: &Value) -> bool {
    plugin.get("type").and_then(Value::as_str) == Some(conf::PLUGIN_TYPE)
}

/// The node's CNI configuration list `data`: putting the plugin last in
/// it, once, keeps everything else; doing it again changes nothing; taking
/// it out leaves the other plugins as they were.
pub fn cni_conflist(data: &[u8]) {
    let dir = conf_dir();
    let file: PathBuf = dir.join("10-net.conflist");
    std::fs::write(&file, data).expect("writing the configuration");
    let entry = PluginConf::new(
        "/run/lattice/cni.sock".into(),
        FailurePolicy::Fail,
        vec!["kube-system".into()],
    );
    let installed = match conf::install(dir, &entry) {
        Ok(installed) => installed,
        Err(_) => {
            assert_eq!(
                std::fs::read(&file).unwrap(),
                data,
                "a refused file is left alone"
            );
            return;
        }
    };
    assert_eq!(installed.file, file);
    let before: Value = serde_json::from_slice(data).expect("install read it as JSON");
    let after: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    let others: Vec<Value> = plugins(&before)
        .into_iter()
        .filter(|p| !is_ours(p))
        .collect();
    let ours = serde_json::to_value(&entry).unwrap();
    let mut want = others.clone();
    want.push(ours);
    assert_eq!(plugins(&after), want);
    let strip = |mut v: Value| {
        v.as_object_mut().unwrap().remove("plugins");
        v
    };
    assert_eq!(strip(after), strip(before.clone()), "other keys kept");

    let again = conf::install(dir, &entry).expect("installs again");
    assert!(!again.changed, "install is idempotent");
    assert_eq!(conf::uninstall(dir).unwrap(), vec![file.clone()]);
    let removed: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    assert_eq!(plugins(&removed), others);
    assert_eq!(strip(removed), strip(before));
}

// ---------------------------------------------------------------- framing

/// Input layout of the frame targets: a byte for the line cap, one for
/// the read size, one for the descriptors that came along; the rest is
/// what the peer sent.
struct FrameInput<'a> {
    cap: usize,
    chunk: usize,
    fds: usize,
    stream: &'a [u8],
}

impl<'a> FrameInput<'a> {
    fn parse(data: &'a [u8]) -> Option<Self> {
        let (&[cap, chunk, fds], stream) = data.split_first_chunk::<3>()?;
        Some(Self {
            cap: usize::from(cap) * 4,
            chunk: usize::from(chunk) + 1,
            fds: usize::from(fds),
            stream,
        })
    }

    /// The lines a reader gets, read by `chunk` bytes and taken as they
    /// complete, and how reading ended; checked against the stream cut at
    /// each `\n` all at once.
    fn lines(&self) -> Vec<Vec<u8>> {
        let mut lines = Lines::new(self.cap);
        let mut got = Vec::new();
        let mut refused = false;
        for chunk in self.stream.chunks(self.chunk) {
            if let Err(e) = lines.push(chunk) {
                assert!(matches!(e, FrameError::TooLong { max } if max == self.cap));
                refused = true;
                break;
            }
            while let Some(line) = lines.next_line() {
                assert!(line.len() <= self.cap && !line.contains(&b'\n'));
                got.push(line);
            }
            // Between reads only an unfinished line is held, within the cap.
            assert!(
                lines.buffered() <= self.cap,
                "{} buffered",
                lines.buffered()
            );
        }
        let mut whole: Vec<&[u8]> = self.stream.split(|b| *b == b'\n').collect();
        let unfinished = whole.pop().unwrap_or_default();
        let too_long = whole
            .iter()
            .chain([&unfinished])
            .any(|l| l.len() > self.cap);
        assert_eq!(refused, too_long, "refused iff some line passes the cap");
        assert!(got.len() <= whole.len());
        for (a, b) in got.iter().zip(&whole) {
            assert_eq!(a, b, "lines do not depend on how reads cut them");
        }
        if !refused {
            assert_eq!(got.len(), whole.len());
        }
        got
    }
}

/// Decodes `line` as `T`; what decodes encodes and decodes to itself.
fn round_trips<T>(line: &[u8])
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    if let Ok(message) = serde_json::from_slice::<T>(line) {
        let again = serde_json::to_vec(&message).unwrap();
        assert_eq!(serde_json::from_slice::<T>(&again).unwrap(), message);
    }
}

/// The CNI protocol's frames: lines within their cap, requests and
/// replies that decode.
pub fn cni_frame(data: &[u8]) {
    let Some(input) = FrameInput::parse(data) else {
        return;
    };
    for line in input.lines() {
        // The agent's decoder is serde's: the same verdict.
        assert_eq!(
            protocol::decode::<protocol::Request>(&line).ok(),
            serde_json::from_slice::<protocol::Request>(&line).ok()
        );
        round_trips::<protocol::Request>(&line);
        round_trips::<protocol::Reply>(&line);
    }
}

/// The handover protocol's frames: lines within their cap; an answer is
/// accepted only when it announces exactly the descriptors that came
/// with it, within what one message carries.
pub fn handover_frame(data: &[u8]) {
    let Some(input) = FrameInput::parse(data) else {
        return;
    };
    for line in input.lines() {
        round_trips::<handover::Request>(&line);
        round_trips::<handover::Batch>(&line);
        if let Ok(batch) = handover::Batch::decode(&line, input.fds) {
            assert!(batch.pods.len() <= handover::PODS_PER_BATCH);
            let announced: usize = batch
                .pods
                .iter()
                .map(|p| p.sockets + usize::from(p.netns))
                .sum();
            assert_eq!(announced, input.fds);
            assert!(announced <= lattice_cni::frame::MAX_FDS);
        }
    }
}
