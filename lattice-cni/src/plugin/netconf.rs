//! The network configuration on stdin: the plugin's entry of the
//! `.conflist` ([`PluginConf`]) plus what the runtime adds to it
//! (`cniVersion`, `name`, and `prevResult`, the previous plugin's result).

use std::time::Duration;

use serde::Deserialize;
use serde_json::{Map, Value};

use super::{
    env::CniCommand,
    error::{CniError, Code},
};
use crate::conf::PluginConf;

/// The newest CNI version the plugin speaks.
pub const LATEST_VERSION: &str = "1.1.0";
/// Every version whose results carry `cniVersion` and may be passed on
/// unchanged (chaining began with 0.3.0).
pub const SUPPORTED_VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    pub cni_version: String,
    #[serde(flatten)]
    pub plugin: PluginConf,
    /// The previous plugin's result (ADD), the chain's result (CHECK, DEL).
    #[serde(default)]
    pub prev_result: Option<Value>,
}

impl NetConf {
    /// Reads and checks the configuration. The error is in the
    /// configuration's CNI version once that is known.
    pub fn parse(stdin: &[u8]) -> Result<Self, CniError> {
        if stdin.iter().all(u8::is_ascii_whitespace) {
            return Err(CniError::new(
                Code::Decode,
                "no network configuration on stdin",
            ));
        }
        let value: Value = serde_json::from_slice(stdin).map_err(|e| {
            CniError::new(
                Code::Decode,
                format!("the network configuration on stdin is not JSON: {e}"),
            )
        })?;
        let Some(version) = value.get("cniVersion").and_then(Value::as_str) else {
            return Err(CniError::new(
                Code::InvalidConfig,
                "the network configuration has no cniVersion",
            ));
        };
        let version = version.to_owned();
        if !SUPPORTED_VERSIONS.contains(&version.as_str()) {
            return Err(CniError::new(
                Code::IncompatibleVersion,
                format!(
                    "CNI version {version} is not supported (supported: {})",
                    SUPPORTED_VERSIONS.join(", ")
                ),
            )
            .in_version(&version));
        }
        let invalid = |msg: String| CniError::new(Code::InvalidConfig, msg).in_version(&version);
        let conf = Self::deserialize(value)
            .map_err(|e| invalid(format!("invalid lattice-cni configuration: {e}")))?;
        if conf.plugin.timeout_seconds == 0 {
            return Err(invalid(
                "invalid lattice-cni configuration: timeoutSeconds must be at least 1".into(),
            ));
        }
        Ok(conf)
    }

    /// Whether the configuration's version has `command` (CHECK came with
    /// 0.4.0, STATUS and GC with 1.1.0).
    pub fn allows(&self, command: CniCommand) -> Result<(), CniError> {
        let since = match command {
            CniCommand::Check => "0.4.0",
            CniCommand::Status | CniCommand::Gc => "1.1.0",
            _ => return Ok(()),
        };
        if version_tuple(&self.cni_version) >= version_tuple(since) {
            return Ok(());
        }
        Err(CniError::new(
            Code::IncompatibleVersion,
            format!(
                "{} needs CNI version {since} or later; the configuration has {}",
                command.name(),
                self.cni_version
            ),
        )
        .in_version(&self.cni_version))
    }

    /// How long the plugin waits for the agent.
    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.plugin.timeout_seconds)
    }

    pub fn is_exempt(&self, namespace: &str) -> bool {
        self.plugin.exempt_namespaces.iter().any(|n| n == namespace)
    }

    /// The previous result, required: the plugin only makes sense after
    /// the plugins that give the pod its network.
    pub fn prev_result(&self) -> Result<&Map<String, Value>, CniError> {
        let missing = || {
            CniError::new(
                Code::InvalidConfig,
                "no prevResult: lattice-cni must be chained after the plugins that set up \
                 the pod's network (last in the .conflist's plugins)",
            )
            .in_version(&self.cni_version)
        };
        match &self.prev_result {
            None | Some(Value::Null) => Err(missing()),
            Some(Value::Object(result)) => Ok(result),
            Some(_) => Err(
                CniError::new(Code::InvalidConfig, "prevResult is not a result object")
                    .in_version(&self.cni_version),
            ),
        }
    }

    /// ADD's output when the plugin changes nothing: the previous result,
    /// in the configuration's CNI version.
    pub fn passthrough(&self) -> Result<Value, CniError> {
        let mut result = self.prev_result()?.clone();
        result.insert("cniVersion".into(), Value::String(self.cni_version.clone()));
        Ok(Value::Object(result))
    }
}

/// "1.0.0" as (1, 0, 0); only supported versions get here.
fn version_tuple(version: &str) -> Vec<u32> {
    version.split('.').map(|p| p.parse().unwrap_or(0)).collect()
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use serde_json::json;

    use super::*;
    use crate::conf::FailurePolicy;

    /// The plugin's entry as the agent writes it, with what the runtime adds.
    fn stdin(extra: Value) -> Vec<u8> {
        let mut conf = json!({
            "cniVersion": "0.4.0",
            "name": "aws-cni",
            "type": "lattice-cni",
            "socket": "/run/lattice/cni.sock",
            "failurePolicy": "ignore",
            "exemptNamespaces": ["kube-system"],
            "timeoutSeconds": 10
        });
        for (k, v) in extra.as_object().unwrap() {
            conf[k] = v.clone();
        }
        serde_json::to_vec(&conf).unwrap()
    }

    fn prev() -> Value {
        json!({
            "cniVersion": "0.4.0",
            "interfaces": [{"name": "eth0", "sandbox": "/var/run/netns/cni-1"}],
            "ips": [{"version": "4", "address": "10.0.0.5/32", "interface": 0}]
        })
    }

    #[test]
    fn reads_the_plugin_entry_and_the_runtime_keys() {
        let conf = NetConf::parse(&stdin(json!({"prevResult": prev()}))).unwrap();
        assert_eq!(conf.cni_version, "0.4.0");
        assert_eq!(conf.plugin.socket, PathBuf::from("/run/lattice/cni.sock"));
        assert_eq!(conf.plugin.failure_policy, FailurePolicy::Ignore);
        assert!(conf.is_exempt("kube-system"));
        assert!(!conf.is_exempt("shop"));
        assert_eq!(conf.timeout(), Duration::from_secs(10));
        assert_eq!(conf.prev_result().unwrap(), prev().as_object().unwrap());
    }

    #[test]
    fn passthrough_is_the_previous_result_in_the_config_version() {
        let mut older = prev();
        older["cniVersion"] = json!("0.3.1");
        let conf = NetConf::parse(&stdin(json!({"prevResult": older}))).unwrap();
        assert_eq!(conf.passthrough().unwrap(), prev());

        let conf = NetConf::parse(&stdin(json!({}))).unwrap();
        let err = conf.passthrough().unwrap_err();
        assert_eq!(err.code, Code::InvalidConfig);
        assert!(err.msg.contains("must be chained after"), "{}", err.msg);
        assert_eq!(err.to_json()["cniVersion"], "0.4.0");
        let err = NetConf::parse(&stdin(json!({"prevResult": []})))
            .unwrap()
            .passthrough()
            .unwrap_err();
        assert_eq!(err.msg, "prevResult is not a result object");
    }

    #[test]
    fn bad_input_gets_the_right_code() {
        let code = |input: &[u8]| NetConf::parse(input).unwrap_err().code;
        assert_eq!(code(b""), Code::Decode);
        assert_eq!(code(b"{not json"), Code::Decode);
        assert_eq!(code(br#"{"type": "lattice-cni"}"#), Code::InvalidConfig);
        assert_eq!(
            code(&stdin(json!({"cniVersion": "0.2.0"}))),
            Code::IncompatibleVersion
        );
        assert_eq!(
            code(&stdin(json!({"failurePolicy": "maybe"}))),
            Code::InvalidConfig
        );
        assert_eq!(
            code(&stdin(json!({"timeoutSeconds": 0}))),
            Code::InvalidConfig
        );

        let mut no_socket: Value = serde_json::from_slice(&stdin(json!({}))).unwrap();
        no_socket.as_object_mut().unwrap().remove("socket");
        let err = NetConf::parse(&serde_json::to_vec(&no_socket).unwrap()).unwrap_err();
        assert_eq!(err.code, Code::InvalidConfig);
        assert!(err.msg.contains("socket"), "{}", err.msg);
        assert_eq!(err.to_json()["cniVersion"], "0.4.0");
    }

    #[test]
    fn commands_newer_than_the_config_version_are_refused() {
        let conf = NetConf::parse(&stdin(json!({}))).unwrap();
        assert!(conf.allows(CniCommand::Add).is_ok());
        assert!(conf.allows(CniCommand::Check).is_ok());
        let err = conf.allows(CniCommand::Status).unwrap_err();
        assert_eq!(err.code, Code::IncompatibleVersion);
        let old = NetConf::parse(&stdin(json!({"cniVersion": "0.3.1"}))).unwrap();
        assert!(old.allows(CniCommand::Check).is_err());
        let new = NetConf::parse(&stdin(json!({"cniVersion": "1.1.0"}))).unwrap();
        assert!(new.allows(CniCommand::Gc).is_ok());
    }
}
