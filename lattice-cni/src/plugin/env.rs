//! The runtime's `CNI_*` environment variables, and the Kubernetes pod
//! named in `CNI_ARGS`.

use std::{collections::BTreeMap, ffi::OsString};

use super::error::{CniError, Code};

pub const COMMAND: &str = "CNI_COMMAND";
pub const CONTAINER_ID: &str = "CNI_CONTAINERID";
pub const NETNS: &str = "CNI_NETNS";
pub const IFNAME: &str = "CNI_IFNAME";
pub const ARGS: &str = "CNI_ARGS";
/// The variables the plugin reads (`CNI_PATH` it does not need: it runs
/// no other plugin).
const VARS: [&str; 5] = [COMMAND, CONTAINER_ID, NETNS, IFNAME, ARGS];

/// `CNI_COMMAND`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CniCommand {
    Add,
    Del,
    Check,
    Status,
    Gc,
    Version,
}

impl CniCommand {
    const ALL: [Self; 6] = [
        Self::Add,
        Self::Del,
        Self::Check,
        Self::Status,
        Self::Gc,
        Self::Version,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Add => "ADD",
            Self::Del => "DEL",
            Self::Check => "CHECK",
            Self::Status => "STATUS",
            Self::Gc => "GC",
            Self::Version => "VERSION",
        }
    }
}

/// A Kubernetes pod, from `CNI_ARGS`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pod {
    pub namespace: String,
    /// Empty when the runtime does not pass it.
    pub name: String,
    pub uid: String,
}

/// The environment the runtime ran the plugin with (only the variables the
/// plugin reads).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Env {
    vars: BTreeMap<&'static str, String>,
}

impl Env {
    pub fn from_process() -> Result<Self, CniError> {
        Self::from_lookup(|name| std::env::var_os(name))
    }

    /// Reads the variables through `lookup`; a value that is not UTF-8 is
    /// an error.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<OsString>) -> Result<Self, CniError> {
        let mut vars = BTreeMap::new();
        for name in VARS {
            if let Some(value) = lookup(name) {
                let value = value.into_string().map_err(|_| {
                    CniError::new(Code::InvalidEnvironment, format!("{name} is not UTF-8"))
                })?;
                vars.insert(name, value);
            }
        }
        Ok(Self { vars })
    }

    /// The variable's value; unset and empty are the same.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.vars
            .get(name)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }

    /// The variable's value, or the error for the runtime.
    pub fn require(&self, name: &str) -> Result<&str, CniError> {
        self.get(name)
            .ok_or_else(|| CniError::new(Code::InvalidEnvironment, format!("{name} is not set")))
    }

    pub fn command(&self) -> Result<CniCommand, CniError> {
        let value = self.require(COMMAND)?;
        CniCommand::ALL
            .into_iter()
            .find(|c| c.name() == value)
            .ok_or_else(|| {
                CniError::new(
                    Code::InvalidEnvironment,
                    format!(
                        "unknown {COMMAND} {value:?}: expected ADD, DEL, CHECK, STATUS, GC or VERSION"
                    ),
                )
            })
    }

    /// The pod `CNI_ARGS` names, if it names one (`K8S_POD_NAMESPACE`).
    pub fn pod(&self) -> Result<Option<Pod>, CniError> {
        let args = parse_args(self.get(ARGS).unwrap_or(""))?;
        let arg = |key: &str| {
            args.iter()
                .rev()
                .find(|(k, _)| *k == key)
                .map(|(_, v)| (*v).to_owned())
                .unwrap_or_default()
        };
        let namespace = arg("K8S_POD_NAMESPACE");
        if namespace.is_empty() {
            return Ok(None);
        }
        Ok(Some(Pod {
            namespace,
            name: arg("K8S_POD_NAME"),
            uid: arg("K8S_POD_UID"),
        }))
    }
}

/// `K=V;K=V` as pairs, in order; empty items (a trailing `;`) are skipped.
pub fn parse_args(args: &str) -> Result<Vec<(&str, &str)>, CniError> {
    args.split(';')
        .filter(|item| !item.is_empty())
        .map(|item| {
            item.split_once('=').ok_or_else(|| {
                CniError::new(
                    Code::InvalidEnvironment,
                    format!("{ARGS}: {item:?} is not KEY=VALUE"),
                )
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> Env {
        Env::from_lookup(|name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| OsString::from(v))
        })
        .unwrap()
    }

    #[test]
    fn containerd_args_name_the_pod() {
        let e = env(&[(
            ARGS,
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=cart-0;\
             K8S_POD_INFRA_CONTAINER_ID=0123abcd;K8S_POD_UID=8a1d4b5c-2f3e",
        )]);
        assert_eq!(
            e.pod().unwrap(),
            Some(Pod {
                namespace: "shop".into(),
                name: "cart-0".into(),
                uid: "8a1d4b5c-2f3e".into(),
            })
        );
    }

    #[test]
    fn args_edge_cases() {
        assert_eq!(parse_args("").unwrap(), []);
        assert_eq!(parse_args("A=1;;B=;").unwrap(), [("A", "1"), ("B", "")]);
        assert_eq!(parse_args("A=x=y").unwrap(), [("A", "x=y")]);
        let err = parse_args("A=1;oops").unwrap_err();
        assert_eq!(err.code, Code::InvalidEnvironment);
        assert_eq!(err.msg, r#"CNI_ARGS: "oops" is not KEY=VALUE"#);

        // No namespace (or an empty one): not a Kubernetes pod.
        assert_eq!(env(&[]).pod().unwrap(), None);
        assert_eq!(env(&[(ARGS, "K8S_POD_NAME=x")]).pod().unwrap(), None);
        assert_eq!(env(&[(ARGS, "K8S_POD_NAMESPACE=")]).pod().unwrap(), None);
        let only_ns = env(&[(ARGS, "K8S_POD_NAMESPACE=a")])
            .pod()
            .unwrap()
            .unwrap();
        assert_eq!((only_ns.name.as_str(), only_ns.uid.as_str()), ("", ""));
    }

    #[test]
    fn command_and_required_variables() {
        assert_eq!(env(&[(COMMAND, "ADD")]).command().unwrap(), CniCommand::Add);
        assert_eq!(env(&[(COMMAND, "GC")]).command().unwrap(), CniCommand::Gc);
        let unknown = env(&[(COMMAND, "add")]).command().unwrap_err();
        assert_eq!(unknown.code, Code::InvalidEnvironment);
        assert!(unknown.msg.starts_with(r#"unknown CNI_COMMAND "add""#));
        let missing = env(&[]).command().unwrap_err();
        assert_eq!(missing.msg, "CNI_COMMAND is not set");
        let empty = env(&[(NETNS, "")]).require(NETNS).unwrap_err();
        assert_eq!(empty.msg, "CNI_NETNS is not set");
    }

    #[test]
    fn non_utf8_is_an_environment_error() {
        use std::os::unix::ffi::OsStringExt as _;
        let err =
            Env::from_lookup(|name| (name == NETNS).then(|| OsString::from_vec(vec![b'/', 0xff])))
                .unwrap_err();
        assert_eq!(
            (err.code, err.msg.as_str()),
            (Code::InvalidEnvironment, "CNI_NETNS is not UTF-8")
        );
    }
}
